"""Checks of the environment variables and the network a multi-process or multi-machine run needs."""

from __future__ import annotations

import socket

from .model import Check, Facts, RunView


# NCCL/torch variables that slow or break training, with what they do and on which machines.
def check_env(facts: Facts, view: RunView | None) -> list[Check]:
    env, hw = facts.environ, facts.hardware
    out = []
    multi_gpu = hw.gpu_count > 1
    has_p2p = bool(hw.nvlink_pairs or hw.p2p_pairs)
    link = "NVLink" if hw.nvlink_pairs else "PCIe peer-to-peer"
    if env.get("NCCL_P2P_DISABLE", "0") not in ("", "0") and multi_gpu and has_p2p:
        out.append(Check("network", "NCCL_P2P_DISABLE", "warn",
                         f"NCCL_P2P_DISABLE={env['NCCL_P2P_DISABLE']} turns off {link} between the GPUs: "
                         "collectives go through host memory, several times slower", "unset NCCL_P2P_DISABLE"))
    if env.get("NCCL_P2P_LEVEL", "").upper() in ("LOC", "0") and multi_gpu and has_p2p:
        out.append(Check("network", "NCCL_P2P_LEVEL", "warn", f"NCCL_P2P_LEVEL={env['NCCL_P2P_LEVEL']} disables "
                         f"{link} between the GPUs", "unset NCCL_P2P_LEVEL"))
    if env.get("NCCL_SHM_DISABLE", "0") not in ("", "0") and multi_gpu and not has_p2p:
        out.append(Check("network", "NCCL_SHM_DISABLE", "warn", "NCCL_SHM_DISABLE with GPUs that have no "
                         "peer-to-peer: NCCL falls back to sockets within the machine", "unset NCCL_SHM_DISABLE"))
    if env.get("NCCL_IB_DISABLE", "0") not in ("", "0") and view is not None and view.machines > 1 and not view.use_cpu:
        out.append(Check("network", "NCCL_IB_DISABLE", "warn", "NCCL_IB_DISABLE: machines talk over TCP sockets, "
                         "not InfiniBand/RoCE", "unset NCCL_IB_DISABLE unless the machines have no IB/RoCE"))
    for var in ("NCCL_ALGO", "NCCL_PROTO"):
        if env.get(var):
            out.append(Check("network", var, "warn", f"{var}={env[var]} overrides NCCL's own tuning",
                             f"unset {var} unless you measured it faster"))
    if env.get("NCCL_DEBUG", "").upper() == "TRACE":
        out.append(Check("network", "NCCL_DEBUG", "warn", "NCCL_DEBUG=TRACE logs every call and slows training",
                         "use NCCL_DEBUG=INFO or WARN"))
    if env.get("CUDA_LAUNCH_BLOCKING", "0") not in ("", "0") and hw.gpus:
        out.append(Check("network", "CUDA_LAUNCH_BLOCKING", "warn", "CUDA_LAUNCH_BLOCKING=1 serialises every "
                         "kernel launch (a debugging aid)", "unset CUDA_LAUNCH_BLOCKING"))
    if env.get("TORCH_DISTRIBUTED_DEBUG", "").upper() == "DETAIL":
        out.append(Check("network", "TORCH_DISTRIBUTED_DEBUG", "warn", "TORCH_DISTRIBUTED_DEBUG=DETAIL checks every "
                         "collective and slows training", "unset TORCH_DISTRIBUTED_DEBUG"))
    for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
        value = env.get(var)
        if value and not value.startswith("^") and facts.interfaces:
            names = [n.strip() for n in value.split(",") if n.strip()]
            found = any((n[1:] in facts.interfaces) if n.startswith("=")
                        else any(i.startswith(n) for i in facts.interfaces) for n in names)
            if not found:
                out.append(Check("network", var, "fail", f"{var}={value} matches no interface here "
                                 f"({', '.join(facts.interfaces)})", f"set {var} to one of them or unset it"))
    return out


def check_network(facts: Facts, view: RunView | None) -> list[Check]:
    out = check_env(facts, view)
    if view is None:
        return out
    cluster = view.spec.cluster
    port = cluster.main_process_port
    if view.machines > 1:
        if facts.address_error:
            out.append(Check("network", "main address", "fail", f"{cluster.main_process_ip}: {facts.address_error}",
                             "set --main-process-ip to an address of the rank-0 machine that resolves here"))
        else:
            resolved = f" -> {facts.address}" if facts.address and facts.address != cluster.main_process_ip else ""
            out.append(Check("network", "main address", "ok", f"{cluster.main_process_ip}{resolved}"))
        if cluster.launcher == "deepspeed":
            for tool in ("pdsh", "ssh"):
                path = facts.tools.get(tool)
                out.append(Check("network", tool, "ok" if path else "fail",
                                 path or f"not found: the DeepSpeed hostfile launcher needs {tool}",
                                 "" if path else f"apt-get install {'pdsh' if tool == 'pdsh' else 'openssh-client'}, "
                                 "or use --launcher accelerate"))
    if facts.port_checked:
        where = "on this machine (rank 0)" if view.machines > 1 else "for the local rendezvous"
        if facts.port_error and view.machines == 1:  # accelerate moves a one-machine rendezvous to a free port
            out.append(Check("network", "port", "warn", f"{port} {where}: {facts.port_error}; accelerate will "
                             "pick a free port instead", "choose another --main-process-port to silence its warning"))
        elif facts.port_error:  # the other machines connect to this one: it must listen where they look
            out.append(Check("network", "port", "fail", f"{port} {where}: {facts.port_error}",
                             "choose another --main-process-port (or stop the run that holds it)"))
        else:
            out.append(Check("network", "port", "ok", f"{port} is free {where}"))
    elif view.machines > 1:
        out.append(Check("network", "port", "ok", f"{port}: checked on the rank-0 machine, not here"))
    return out


def resolve_address(host: str) -> tuple[str | None, str | None]:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return None, f"does not resolve ({exc.args[-1] if exc.args else exc})"
    return (infos[0][4][0] if infos else None), None


def port_error(port: int) -> str | None:
    """Why the rendezvous could not listen on `port` here (None: it can). Bound the way torch's
    TCPStore binds it (all addresses, SO_REUSEADDR), then released at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
            sock.listen(1)
        except OSError as exc:
            return "already in use" if exc.errno == 98 else (exc.strerror or str(exc))
    return None
