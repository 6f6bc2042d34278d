"""Offline DRO trainer: label, extract, fit, optimize, export. Never imported by the gateway."""
