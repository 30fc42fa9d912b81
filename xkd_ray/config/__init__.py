"""Configuration: the experiment schema (pydantic), the YAML loader and the search space.

Nothing here imports torch, captum or Ray: validating a YAML file needs only the registries'
names, which live in torch-free leaf modules (``xkd_ray.config.registries``).
"""
