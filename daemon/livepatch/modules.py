"""Patch modules: an admitted bundle loaded into the module area, its functions made ftrace records, and the
klp objects and funcs its manifest describes (klp_init_patch / klp_init_object_loaded)."""

from __future__ import annotations

from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from daemon.ftrace import Ftrace, SymbolAt, SymbolLookup, ftrace_call_adjust, records_from
from daemon.kernel.kernel import Kernel
from daemon.livepatch import artifact
from daemon.livepatch.klp import KlpFunc, KlpObject, KlpPatch
from daemon.module_loader import LoadedModule, ModuleLoader
from patchformat.bundle import PatchBundle


class PatchModules:
    """Loads and drops the modules behind live patches on one kernel."""

    def __init__(self, kernel: Kernel, ftrace: Ftrace, loader: ModuleLoader,
                 trusted_keys: Iterable[Ed25519PublicKey] | None) -> None:
        self.kernel = kernel
        self.ftrace = ftrace
        self.loader = loader
        self.trusted_keys = None if trusted_keys is None else list(trusted_keys)
        self._symbols: dict[str, SymbolLookup] = {}

    def load(self, bundle: PatchBundle) -> KlpPatch:
        """Admit (signature unless no keys are configured, build id, functions), load, build the patch."""
        m = bundle.manifest
        if self.trusted_keys is None:
            artifact.check_object(m, bundle.object)
            artifact.check_target(m, self.kernel.image, self.kernel.kallsyms)
        else:
            artifact.admit(bundle, self.trusted_keys, self.kernel.image, self.kernel.kallsyms)
        module = self.loader.load(m.name, bundle.object)
        try:
            self._add_records(module)
            return self._build(module, bundle)
        except BaseException:
            self.drop(module)
            raise

    def drop(self, module: LoadedModule) -> None:
        """Forget the module's records (none may be traced) and unload it."""
        self.ftrace.remove_records(ftrace_call_adjust(e) for e in module.patchable_entries)
        symbols = self._symbols.pop(module.name, None)
        if symbols is not None:
            self.ftrace.forget_symbols(symbols)
        self.loader.unload(module)

    def _build(self, module: LoadedModule, bundle: PatchBundle) -> KlpPatch:
        m = bundle.manifest
        objects = []
        for o in m.objects:
            funcs = []
            for f in o.funcs:
                old = artifact.old_function(self.kernel.kallsyms, f.old_name, f.old_sympos, m.name)
                new = module.symbol(f.new_name)
                funcs.append(KlpFunc(f.old_name, f.old_sympos, old.addr, old.size, f.new_name, new.addr, new.size))
            callbacks = {k: module.addr(v) for k, v in o.callbacks.named().items()}
            objects.append(KlpObject(o.name, funcs, callbacks))
        return KlpPatch(m.name, m, module, objects, m.replace, {s.id: s.version for s in m.states})

    def _add_records(self, module: LoadedModule) -> None:
        """ftrace_module_init: the module's patchable functions become records, reached through its PLT."""
        def name_at(addr: int) -> str | None:
            sym = module.containing(addr)
            return sym.name if sym is not None and sym.addr == addr else None
        recs = records_from(module.patchable_entries, name_at, module=module.name, plt=module.ftrace_plt or 0)

        def symbol_at(addr: int) -> SymbolAt | None:
            sym = module.containing(addr) if module.contains(addr) else None
            if sym is None:
                return None
            return SymbolAt(sym.name, sym.addr, sym.size, addr - sym.addr, sym.is_func, module.name)

        self.ftrace.add_records(recs, symbols=symbol_at)
        self._symbols[module.name] = symbol_at
