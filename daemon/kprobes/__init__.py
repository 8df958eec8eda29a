"""arm64 kprobes: BRK probes with out-of-line single-step slots, driven from the host, handled in the guest."""
