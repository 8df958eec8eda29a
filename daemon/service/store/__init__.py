"""What a host keeps on disk: the request journal (``journal``), the desired state (``desired``), their WAL
checkpoints and group fsync (``checkpoint``, ``durability``), journaled replies read back (``stored``) and the
check of the state directory before it is opened (``integrity``)."""
