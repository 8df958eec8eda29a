"""Live patching: klp patches, transitions, shadow variables, states, callbacks."""
