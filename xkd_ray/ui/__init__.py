"""What a person sees: the ``xkd`` command line and its tables."""
