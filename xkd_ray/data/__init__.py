"""Datasets and splits: where images come from and how they are carved into train/val/test."""
