"""Throughput, metrics files and console output."""
