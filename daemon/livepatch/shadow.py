"""Shadow variables (Linux's kernel/livepatch/shadow.c): the host side, which is the table's only writer.

The guest kernel keeps the table, ``klp_shadow_hash`` (``1 << SHADOW_HASH_BITS`` buckets of singly linked
``struct klp_shadow`` nodes, the data right after the 32-byte header), and looks variables up itself
(``klp_shadow_get`` walks a bucket: no host call). Everything that changes the table traps to the host with
``host_call(HC_SHADOW, op, &req)``; :class:`ShadowVars` serves those calls on the trapping vCPU's thread, under
one lock that plays ``klp_shadow_lock`` (the emulated CPUs have no cross-CPU atomics, so a guest spinlock could
not be made correct). The result goes back in ``cpu_data[cpu].trap.ret``; ``req.node``/``req.existing`` are
written into the guest's request.

=================  =======================================================================================
SHADOW_RESERVE     <obj, id> linked: ``existing = 1``, return it. Else a zeroed, unlinked node (0 if the heap
                   is exhausted); the guest runs the constructor on it before anyone can see it
SHADOW_LINK        publish the reserved node at the head of its bucket, or, if another CPU published the
                   same <obj, id> meanwhile, free ours and return theirs with ``existing = 1``
SHADOW_DISCARD     the constructor failed: free the reserved node (it was never visible)
SHADOW_UNLINK      unhash <obj, id> and return it (0 if none); the guest then runs the destructor on it
SHADOW_UNLINK_ID   the same for some node with this id (the guest repeats until 0: klp_shadow_free_all)
=================  =======================================================================================

Publishing: ``node->next`` is written first, then the bucket head (or the predecessor's ``next``) with one
8-byte store, so a guest walking the bucket concurrently sees the old chain or the new one, never half.
Unlinking leaves the node's own ``next`` intact (a reader standing on it walks on) and puts the node in
*quarantine*: its memory is reused only after a grace period, :meth:`ShadowVars.synchronize` (a stop-machine
pause: every vCPU passes a safe point, so no guest walk started before it is still running) — the ``kfree_rcu``
of Linux.

``klp_shadow_alloc`` of an existing pair returns NULL with Linux's warning ("Duplicate shadow variable <%p,
%lx>"): the guest marks its requests from klp_shadow_alloc (``req.warn``) and sends a duplicate it found itself
to the host too, so every duplicate is warned about; a failed constructor's error comes in ``req.err``.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from daemon.errors import GuestError
from daemon.guest import abi
from daemon.kernel.kernel import Kernel

log = structlog.get_logger(__name__)

HEADER = abi.klp_shadow.size  # KLP_SHADOW_SIZE: the data starts here, 16-byte aligned like the node
NR_BUCKETS = 1 << abi.SHADOW_HASH_BITS
MAX_DATA_SIZE = 1 << 20  # a larger request fails like an impossible kzalloc (NULL), it does not eat the heap
_MASK = (1 << 64) - 1
_TRAP_RET = abi.cpu_data.offsetof("trap") + abi.host_trap.offsetof("ret")
_TRAP_FP = abi.cpu_data.offsetof("trap") + abi.host_trap.offsetof("fp")
_TRAP_LR = abi.cpu_data.offsetof("trap") + abi.host_trap.offsetof("lr")
_NEXT = abi.klp_shadow.offsetof("next")
_OBJ, _ID, _SIZE = (abi.klp_shadow.offsetof(f) for f in ("obj", "id", "data_size"))
_OP_NAMES = {abi.SHADOW_RESERVE: "reserve", abi.SHADOW_LINK: "link", abi.SHADOW_DISCARD: "discard",
             abi.SHADOW_UNLINK: "unlink", abi.SHADOW_UNLINK_ID: "unlink_id"}


def bucket_of(obj: int) -> int:
    """The bucket of ``obj``: hash_ptr-like, exactly as the guest's shadow_bucket()."""
    return (((obj >> 4) * abi.HASH_MULTIPLIER) & _MASK) >> (64 - abi.SHADOW_HASH_BITS)


@dataclass(frozen=True)
class ShadowEntry:
    """One published shadow variable: ``data`` is the guest address of its ``size`` bytes."""

    obj: int
    id: int
    data: int
    size: int


@dataclass
class _Node:
    addr: int
    obj: int
    id: int
    size: int  # data size

    @property
    def alloc_size(self) -> int:
        return HEADER + self.size


class ShadowVars:
    """The writers of one kernel's shadow-variable table; registers itself for ``HC_SHADOW`` on creation.

    One per kernel (it owns the table): create it before any patch that uses shadow variables runs, or the
    guest's first writer call is an unknown host call and stops its vCPU.
    """

    def __init__(self, kernel: Kernel, *, max_messages: int = 256) -> None:
        self.kernel = kernel
        self.mem = kernel.memory
        self.table = kernel.kallsyms.addr("klp_shadow_hash")
        self._lock = threading.Lock()  # klp_shadow_lock
        self._linked: dict[tuple[int, int], _Node] = {}
        self._by_id: dict[int, dict[int, _Node]] = {}  # id -> obj -> node, for SHADOW_UNLINK_ID
        self._reserved: dict[int, _Node] = {}  # node address -> node: allocated, not (yet) published
        self._quarantine: list[tuple[int, _Node]] = []  # (unlink sequence number, node), freed by synchronize()
        self._unlinks = 0
        self.duplicates = 0  # klp_shadow_alloc of an existing <obj, id>: "Duplicate shadow variable"
        self.ctor_failures = 0  # "Failed to construct shadow variable"
        self.alloc_failures = 0  # the node could not be allocated (NULL to the guest)
        self.link_races = 0  # another CPU published the same <obj, id> between a reserve and its link
        self.calls: collections.Counter[str] = collections.Counter()  # host calls served, by op name
        self.messages: collections.deque[str] = collections.deque(maxlen=max_messages)  # dmesg-like
        if any(self.mem.read_u64(self.table + 8 * b) for b in range(NR_BUCKETS)):
            raise GuestError("klp_shadow_hash is not empty: another ShadowVars owns this kernel's table")
        self._ops: dict[int, Callable[[int, int], int]] = {
            abi.SHADOW_RESERVE: self._reserve, abi.SHADOW_LINK: self._link, abi.SHADOW_DISCARD: self._discard,
            abi.SHADOW_UNLINK: self._unlink, abi.SHADOW_UNLINK_ID: self._unlink_id}
        kernel.on_host_call(abi.HC_SHADOW, self._on_call)

    # -- introspection ---------------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Published shadow variables."""
        with self._lock:
            return len(self._linked)

    @property
    def quarantined(self) -> int:
        """Unlinked nodes waiting for a grace period."""
        with self._lock:
            return len(self._quarantine)

    def entries(self) -> list[ShadowEntry]:
        """Every published variable, read from the guest table itself (bucket order, then chain order).

        This is what guest lookups see; under the lock it also matches the host's own record of the table,
        which it checks (a mismatch means something else wrote the table).
        """
        with self._lock:
            out = []
            for b in range(NR_BUCKETS):
                node = self.mem.read_u64(self.table + 8 * b)
                while node:
                    obj, sid = self.mem.read_u64(node + _OBJ), self.mem.read_u64(node + _ID)
                    out.append(ShadowEntry(obj, sid, node + HEADER, self.mem.read_u64(node + _SIZE)))
                    node = self.mem.read_u64(node + _NEXT)
            mine = {(n.obj, n.id, n.addr + HEADER, n.size) for n in self._linked.values()}
            if {(e.obj, e.id, e.data, e.size) for e in out} != mine or len(out) != len(mine):
                raise GuestError("klp_shadow_hash does not match the host's record of it", guest=len(out),
                                 host=len(mine))
            return out

    def get(self, obj: int, id_: int) -> int | None:
        """klp_shadow_get from the host: the data address of <obj, id>, or None."""
        with self._lock:
            node = self._linked.get((obj & _MASK, id_ & _MASK))
            return None if node is None else node.addr + HEADER

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "count": len(self._linked), "reserved": len(self._reserved), "quarantined": len(self._quarantine),
                "bytes": sum(n.alloc_size for n in self._linked.values()),
                "duplicates": self.duplicates, "ctor_failures": self.ctor_failures,
                "alloc_failures": self.alloc_failures, "link_races": self.link_races}

    # -- host-side writers (process context: no constructor or destructor runs) -------------------------------

    def alloc(self, obj: int, id_: int, size: int, init: bytes = b"") -> int | None:
        """klp_shadow_alloc from the host: publish <obj, id> with ``init`` at the start of its zeroed data.

        Returns the data address, or None (and the duplicate warning) if the pair exists.
        """
        if len(init) > size:
            raise ValueError(f"init ({len(init)} bytes) is larger than the variable ({size} bytes)")
        obj, id_ = obj & _MASK, id_ & _MASK
        with self._lock:
            if (obj, id_) in self._linked:
                self._warn_duplicate(obj, id_)
                return None
            node = self._new_node(obj, id_, size)
            if node is None:
                raise GuestError(f"cannot allocate a {size}-byte shadow variable", size=size)
            self.mem.write(node.addr + HEADER, init)
            self._publish(node)
            return node.addr + HEADER

    def free(self, obj: int, id_: int) -> bool:
        """klp_shadow_free from the host (no destructor): True if <obj, id> existed."""
        with self._lock:
            node = self._linked.get((obj & _MASK, id_ & _MASK))
            if node is not None:
                self._unhash(node)
            return node is not None

    def free_all(self, id_: int) -> int:
        """klp_shadow_free_all from the host (no destructor): how many were freed."""
        with self._lock:
            nodes = list(self._by_id.get(id_ & _MASK, {}).values())
            for node in nodes:
                self._unhash(node)
            return len(nodes)

    def synchronize(self, *, paused: bool = False) -> int:
        """Free the quarantined nodes after a grace period; returns how many were freed.

        By default the grace period is a stop-machine pause run here (so call it from a host thread, never
        from a vCPU's, and not inside another stop-machine); nodes unlinked while it runs wait for the next
        call. With ``paused=True`` the caller is itself a stop-machine callback: every vCPU is parked at a safe
        point right now, so every quarantined node may go.
        """
        with self._lock:
            upto = self._unlinks
        if not paused:
            self.kernel.stop_machine(lambda: None)
        with self._lock:
            done = [n for seq, n in self._quarantine if seq <= upto]
            self._quarantine = [(seq, n) for seq, n in self._quarantine if seq > upto]
            for node in done:
                self.kernel.heap.free(node.addr, node.alloc_size)
        return len(done)

    # -- the host call: on the trapping vCPU's thread; the op handlers run with self._lock held ----------------

    def _on_call(self, cpu: int, op: int, req: int) -> None:
        handler = self._ops.get(op)
        if handler is None:
            raise GuestError(f"vCPU {cpu}: unknown shadow-variable operation {op}", cpu=cpu, op=op)
        with self._lock:
            self.calls[_OP_NAMES[op]] += 1
            ret = handler(cpu, req)
        self.mem.write_u64(self.kernel.cpu_data_addr + cpu * abi.cpu_data.size + _TRAP_RET, ret)

    def _req(self, req: int, field: str) -> int:
        return self.mem.read_u64(req + abi.klp_shadow_req.offsetof(field))

    def _set_req(self, req: int, field: str, value: int) -> None:
        self.mem.write_u64(req + abi.klp_shadow_req.offsetof(field), value)

    def _reserve(self, cpu: int, req: int) -> int:
        obj, id_, size = self._req(req, "obj"), self._req(req, "id"), self._req(req, "data_size")
        node = self._linked.get((obj, id_))
        if node is not None:
            self._set_req(req, "existing", 1)
            self._set_req(req, "node", node.addr)
            if self._req(req, "warn"):
                self._warn_duplicate(obj, id_)
            return node.addr
        node = self._new_node(obj, id_, size)
        if node is None:
            self.alloc_failures += 1
            self._message(f"cannot allocate shadow variable <{obj:#x}, {id_:#x}> ({size} bytes)")
            self._set_req(req, "existing", 0)
            self._set_req(req, "node", 0)
            return 0
        self._reserved[node.addr] = node
        self._set_req(req, "existing", 0)
        self._set_req(req, "node", node.addr)
        return node.addr

    def _link(self, cpu: int, req: int) -> int:
        node = self._take_reserved(cpu, req, "link")
        theirs = self._linked.get((node.obj, node.id))
        if theirs is not None:  # another CPU published <obj, id> since our reservation: ours goes
            self.link_races += 1
            self.kernel.heap.free(node.addr, node.alloc_size)  # never visible: no grace period needed
            self._set_req(req, "existing", 1)
            self._set_req(req, "node", theirs.addr)
            if self._req(req, "warn"):
                self._warn_duplicate(node.obj, node.id)
            return theirs.addr
        self._publish(node)
        self._set_req(req, "existing", 0)
        return node.addr

    def _discard(self, cpu: int, req: int) -> int:
        node = self._take_reserved(cpu, req, "discard")
        self.ctor_failures += 1
        err = self._req(req, "err")
        err = err - (1 << 64) if err >> 63 else err
        self._message(f"Failed to construct shadow variable <{node.obj:#x}, {node.id:#x}> ({err})", warning=True)
        self.kernel.heap.free(node.addr, node.alloc_size)
        return 0

    def _unlink(self, _cpu: int, req: int) -> int:
        obj, id_ = self._req(req, "obj"), self._req(req, "id")
        node = self._linked.get((obj, id_))
        if node is None:
            return 0
        self._unhash(node)
        return node.addr

    def _unlink_id(self, _cpu: int, req: int) -> int:
        id_ = self._req(req, "id")
        nodes = self._by_id.get(id_)
        if not nodes:
            return 0
        node = next(iter(nodes.values()))
        self._unhash(node)
        return node.addr

    # -- table internals (self._lock held) -------------------------------------------------------------------

    def _new_node(self, obj: int, id_: int, size: int) -> _Node | None:
        if size > MAX_DATA_SIZE:
            return None
        node = _Node(0, obj, id_, size)
        try:
            node.addr = self.kernel.heap.alloc(node.alloc_size)  # 16-byte aligned, so is the data
        except GuestError:
            return None
        self.mem.write(node.addr, bytes(node.alloc_size))  # kzalloc
        for off, value in ((_OBJ, obj), (_ID, id_), (_SIZE, size)):
            self.mem.write_u64(node.addr + off, value)
        return node

    def _take_reserved(self, cpu: int, req: int, what: str) -> _Node:
        addr = self._req(req, "node")
        node = self._reserved.pop(addr, None)
        if node is None:
            raise GuestError(f"vCPU {cpu}: shadow-variable {what} of node {addr:#x}, which is not reserved",
                             cpu=cpu, node=addr)
        return node

    def _publish(self, node: _Node) -> None:
        slot = self.table + 8 * bucket_of(node.obj)
        self.mem.write_u64(node.addr + _NEXT, self.mem.read_u64(slot))
        # One 8-byte store (write_u64 packs "<Q", which CPython does with one memcpy on a little-endian host):
        # walkers see the old chain or the new one.
        self.mem.write_u64(slot, node.addr)
        self._linked[(node.obj, node.id)] = node
        self._by_id.setdefault(node.id, {})[node.obj] = node

    def _unhash(self, node: _Node) -> None:
        link = self.table + 8 * bucket_of(node.obj)
        cur = self.mem.read_u64(link)
        while cur != node.addr:
            if not cur:
                raise GuestError(f"shadow variable {node.addr:#x} is missing from its bucket", node=node.addr)
            link = cur + _NEXT
            cur = self.mem.read_u64(link)
        self.mem.write_u64(link, self.mem.read_u64(node.addr + _NEXT))  # node->next stays: walkers on it go on
        del self._linked[(node.obj, node.id)]
        by_obj = self._by_id[node.id]
        del by_obj[node.obj]
        if not by_obj:
            del self._by_id[node.id]
        self._unlinks += 1
        self._quarantine.append((self._unlinks, node))

    def _warn_duplicate(self, obj: int, id_: int) -> None:
        self.duplicates += 1
        self._message(f"Duplicate shadow variable <{obj:#x}, {id_:#x}>", warning=True)

    def _message(self, text: str, *, warning: bool = False) -> None:
        self.messages.append(text)
        (log.warning if warning else log.info)("klp_shadow", message=text)
