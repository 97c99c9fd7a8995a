"""fedseg's shared core: configuration, model, parameter split, data, loops and logs.

Nothing here imports from server/, client/ or simulations/.
"""
