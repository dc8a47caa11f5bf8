"""The Flywheel controller: one cycle at a time from a Dataset version to a promoted or rolled
back candidate (``plan`` decides, ``manifests`` builds the job, the pod and the
InferenceService patches, ``router_stats`` reads the router's counters for the guard rails,
``handlers`` does the I/O)."""
