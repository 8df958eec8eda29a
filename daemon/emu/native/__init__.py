"""The emulator's native code: the virtual TLB's fill callback, its reproducible build and cache."""
