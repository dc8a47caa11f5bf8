"""The Dataset controller: curation pods per version, versions and counts in status
(``plan`` decides, ``manifests`` builds the pod, ``store_view`` reads the store, ``handlers``
does the I/O)."""
