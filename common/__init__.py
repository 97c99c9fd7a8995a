"""fedseg's shared core: configuration, model, parameter split, data, training, evaluation and logs.

Nothing here imports from server/, client/ or simulations/.
"""
