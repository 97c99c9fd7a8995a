"""Local multi-site simulation tools: synthetic federations and strategy comparisons."""
