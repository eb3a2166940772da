"""creditgraph: causal credit-limit decisions on heterogeneous user graphs, on Ray."""

__version__ = "0.1.0"
