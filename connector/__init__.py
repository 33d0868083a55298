"""Amplitude Export API -> PostHog connector."""

__version__ = "0.1.0"
