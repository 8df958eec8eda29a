"""Live patching: module loader, klp patches, transitions, shadow variables, states, callbacks."""
