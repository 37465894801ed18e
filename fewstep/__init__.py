"""fewstep: a serving system for distilled few-step generators."""

__version__ = "0.1.0"
