"""Ray glue: Ray Train runs, Tune trials, the teacher job, the MO-ASHA scheduler and the Tune
callbacks. The only package that imports ``ray``."""
