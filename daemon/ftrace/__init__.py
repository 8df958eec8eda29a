"""Dynamic ftrace on the emulated kernel: records, ops, filters, update plans, tracers and tracefs views."""
