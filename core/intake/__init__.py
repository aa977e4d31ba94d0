"""Getting films in: the inbox claim, ingest into Study rows, the watcher, the DICOM listener, stale requeues."""
