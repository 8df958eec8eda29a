"""The live-patch artifact format, shared by the daemon and lpctl: manifests, bundle files, signatures, keys.

Pure format code: it imports neither the daemon, the clients nor the wire schemas (import-linter checks it), so
``lpctl`` can sign and inspect bundles in its own process and agree with the daemon on every byte and key id.
Building a bundle (compiling C against a kernel build) is the daemon's (:mod:`daemon.livepatch.artifact`).

- :mod:`patchformat.manifest`: what a patch replaces, its callbacks and states;
- :mod:`patchformat.bundle`: the ``.lpb`` file (manifest + object + signature);
- :mod:`patchformat.signing`: Ed25519 signatures over a bundle, key files and :func:`~patchformat.signing.key_id`;
- :mod:`patchformat.summary`: what a bundle file holds, as both commands print it;
- :mod:`patchformat.errors`: the refusals (and the root of livepatchd's error tree).
"""
