"""The name of the mechanism a run measured, from its ``run.json``.

``backend/transport/where``: the interposition backend, the transport that
carried the calls (:func:`carrier`) and where the delegate was
(:func:`where`), e.g. ``seccomp/tcp/loopback``, ``seccomp/ipc/same-node``,
``kmod/libzmq-tcp/remote``; ``+Dus`` for an injected delay, ``/offload`` for
offload mode (never pooled with cost mode), and the module's kernel thread
(``kmod-kthread/same-node``: no transport).  Written into kthread runs by
:mod:`testbed.compute.kthread`; read by ``analysis``, which pools runs by it,
so runs over different transports are never pooled.
"""

from __future__ import annotations

import ipaddress

#: Endpoint schemes that never leave the node (no network device, not even loopback).
SAME_NODE_SCHEMES = ("ipc", "inproc", "shm")


def mechanism_label(faithful: bool, flush_caller: bool = False) -> str:
    """The mechanism a kthread run measures (``analysis.compare.mechanism`` adds ``+Dus``)."""
    if faithful:
        return f"kmod-kthread-faithful{'-flushcaller' if flush_caller else ''}/same-node"
    return "kmod-kthread/same-node"


def where(endpoint: str) -> str:
    """``same-node`` (ipc://, inproc://, shm://), ``loopback`` (tcp to 127.0.0.0/8, ::1,
    localhost) or ``remote`` (any other host)."""
    scheme, _, rest = (endpoint or "").partition("://")
    if scheme in SAME_NODE_SCHEMES:
        return "same-node"
    host = rest.rpartition(":")[0].strip("[]")
    if host in ("localhost", ""):
        return "loopback"
    try:
        return "loopback" if ipaddress.ip_address(host).is_loopback else "remote"
    except ValueError:
        return "remote"


def carrier(transport: str | None, endpoint: str, curve: bool = False) -> str:
    """The transport that carried the calls, from run.json ``transport`` and the endpoint.

    Raw ZMTP spoken by the relay itself (``transport`` ``"zmtp"``) is named by its
    socket: ``tcp``, ``ipc``.  libzmq is ``libzmq-tcp``, ``libzmq-ipc`` (with CURVE
    ``libzmq-curve-tcp``).  Any other transport is its own name when it is also the
    endpoint's scheme (``shm`` over ``shm://``), else ``NAME-SCHEME``.  A run.json without
    ``transport`` predates the raw ZMTP relay (2026-12-01), which always used libzmq.
    """
    scheme = (endpoint or "").partition("://")[0] if "://" in (endpoint or "") else "?"
    t = str(transport or "").strip() or "libzmq"
    if t == "zmtp":
        return scheme
    if t == "libzmq":
        return f"libzmq-curve-{scheme}" if curve else f"libzmq-{scheme}"
    return t if t == scheme else f"{t}-{scheme}"


def mechanism(meta: dict) -> str:
    backend = str(meta.get("backend") or "?")
    deleg = meta.get("delegate") if isinstance(meta.get("delegate"), dict) else {}
    delay = deleg.get("delay_us")
    if meta.get("mode") == "kthread":
        label = mechanism_label(bool(deleg.get("faithful")), bool(deleg.get("flush_caller_tlb")))
        return f"{label}+{float(delay):g}us" if delay else label
    endpoint = str(meta.get("endpoint") or "")
    via = carrier(meta.get("transport"), endpoint, bool(meta.get("curve")))
    label = f"{backend}/{via}/{where(endpoint)}"
    if delay:
        label += f"+{float(delay):g}us"
    if meta.get("mode") == "offload":  # executes at the delegate: never pooled with cost mode
        label += "/offload" + offload_variant(meta)
    return label


def offload_variant(meta: dict) -> str:
    """What an offload run changed of how its calls travel: ``+wbBYTES`` (write-behind
    window), ``+raN`` (read-ahead, where it ran); runs of different variants are
    different mechanisms."""
    off = meta.get("offload") if isinstance(meta.get("offload"), dict) else {}
    wb = (off.get("write_behind") or {}).get("window_bytes")
    ra = off.get("read_ahead") or {}
    return (f"+wb{int(wb)}" if wb else "") + (
        f"+ra{int(ra['depth'])}" if ra.get("depth") and ra.get("active") else ""
    )


def is_offload(label: str) -> bool:
    """A mechanism label of offload mode (``…/offload``, with its variant)."""
    return str(label).rsplit("/", 1)[-1].startswith("offload")


def place(label: str) -> str:
    """Where a mechanism's delegate was (``loopback``, ``same-node``, ``remote``), from its
    label, an injected delay left out."""
    parts = str(label).split("/")
    return parts[2].split("+", 1)[0] if len(parts) > 2 else ""
