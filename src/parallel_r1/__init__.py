"""parallel-r1: teach language models parallel thinking with reinforcement learning."""

__version__ = "0.1.0"
