"""Configuration: a TOML file validated into typed objects.

Errors name the file, the key and what to do, e.g.::

    p11gate.toml: token[0].backend: no backend named 'sofhsm' (defined: softhsm)
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .backends.kmip.config import KmipConfig
from .backends.limits_config import KeyBitsConfig
from .backends.pool.config import PoolConfig
from .config_select import TokenSelect
from .metrics_config import MetricsConfig
from .policy.config import RuleConfig
from .remote.config import TlsConfig
from .state.config import StateConfig

DEFAULT_SOCKET = "/run/p11gate/p11gate.sock"
DEFAULT_STATE_DIR = "/var/lib/p11gate"


class ConfigError(Exception):
    """Bad configuration; the message is meant for the operator."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    #: listen addresses, p11-kit style: "unix:path=/abs/path"
    listen: list[str] = Field(default_factory=lambda: [f"unix:path={DEFAULT_SOCKET}"])
    #: where p11gate keeps its state (demo token, registry)
    state_dir: str = DEFAULT_STATE_DIR
    #: largest frame (options + body) accepted from a client, bytes (1 MiB: a certificate
    #: chain, an RSA-16384 wrapped key or a data object of some 100 KiB fit many times;
    #: bulk data goes through the multi-part calls)
    max_frame: int = Field(default=1024 * 1024, ge=4096, le=1 << 30)
    #: largest output buffer a client may ask the backend to fill, bytes
    max_buffer: int = Field(default=1024 * 1024, ge=1024, le=1 << 30)
    #: permissions of the unix socket file: an integer (0o660) or an octal string ("0660")
    socket_mode: int = 0o660
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text", "journal"] = "json"
    #: use uvloop when it is installed (lower latency)
    uvloop: bool = True
    #: the admin socket `p11gate status` talks to (mode 0600); default <state_dir>/admin.sock
    admin_socket: str | None = None
    # -- limits per connection and per identity (frontend/limits.py); a limit that is hit
    #    gives the client the PKCS#11 code for it (or, for connections, a closed socket)
    #    and a log record (rate-limited)
    #: seconds a request frame may take from its first byte to its last; then the
    #: connection is closed (a stalled sender must not hold max_frame bytes forever)
    frame_timeout: float = Field(default=10.0, gt=0, le=3600)
    #: requests of one connection served at once; beyond it the gateway reads no more
    #: from that connection until one is answered (nothing fails; with none answered for
    #: 0.5 s, e.g. waiting for a pool session, only max_pending_reply_bytes bounds it)
    max_calls_in_flight: int = Field(default=32, ge=1, le=4096)
    #: per connection: unsent reply bytes plus what calls in flight hold (request bytes,
    #: 3 KiB each, the output buffers they may fill); above it the gateway reads no more
    #: from that connection until calls finish and its client reads
    max_pending_reply_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024, le=1 << 32)
    #: connections at once (all clients); more are closed at once
    max_connections: int = Field(default=4096, ge=1, le=1 << 20)
    #: connections at once per identity (uid locally, certificate subject over TLS)
    max_connections_per_identity: int = Field(default=256, ge=1, le=1 << 20)
    #: file descriptors kept free for workers, the admin socket, the registry and logs:
    #: with fewer free, new connections are closed at once
    fd_reserve: int = Field(default=64, ge=16, le=1 << 16)
    #: open sessions per connection / per identity (CKR_SESSION_COUNT beyond)
    max_sessions_per_connection: int = Field(default=1024, ge=1, le=1 << 24)
    max_sessions_per_identity: int = Field(default=4096, ge=1, le=1 << 24)
    #: session objects one connection may hold (CKR_DEVICE_MEMORY beyond)
    max_session_objects_per_connection: int = Field(default=1024, ge=1, le=1 << 24)
    #: token objects one identity may own or have created (CKR_DEVICE_MEMORY beyond)
    max_token_objects_per_identity: int = Field(default=1000, ge=1, le=1 << 24)
    #: per identity: bytes of request frames not complete yet, the unsent replies of its
    #: connections beyond 64 KiB each, and what the calls a connection read on past
    #: max_calls_in_flight hold; a connection that takes it beyond is closed at once
    max_buffered_bytes_per_identity: int = Field(default=64 * 1024 * 1024,
                                                 ge=1024 * 1024, le=1 << 40)

    @field_validator("listen", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("listen")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        from .remote.tls import parse_tls_address

        for a in v:
            if a.startswith("tls:"):
                parse_tls_address(a)
            elif not a.startswith("unix:path=/"):
                raise ValueError(
                    f"{a!r}: listeners are 'unix:path=/absolute/path' or 'tls:HOST:PORT'"
                )
        return v

    #: gateway processes serving the same listeners (each with its own backends and
    #: workers; shared state in the store); "auto" = one per core
    processes: int | Literal["auto"] = Field(default=1)

    @field_validator("processes")
    @classmethod
    def _process_count(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 256:
            raise ValueError("processes: 1 to 256, or \"auto\"")
        return v

    def process_count(self) -> int:
        return (os.cpu_count() or 1) if self.processes == "auto" else int(self.processes)

    #: log to this file instead of stderr (reopened on SIGHUP, for logrotate)
    log_file: str | None = None

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _permission_mode(cls, v: object) -> object:
        from .modes import parse_mode

        return parse_mode(v)


class LayerFileConfig(_Strict):
    """One shared object set of a layered soft token (see docs/layers.md)."""

    #: the name tokens' ``layers`` refer to it by
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    #: its SQLite file (absolute; created and initialised on first start)
    path: str

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not os.path.isabs(v):
            raise ValueError(f"{v!r}: give the absolute path of the layer's file")
        return v


#: layers a soft back end may have (a handle carries the layer's number in 7 bits)
MAX_LAYERS = 127


class BackendConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    #: "module": a vendor PKCS#11 module; "soft": the built-in software token;
    #: "kmip": a KMIP server (see docs/kmip.md)
    type: Literal["module", "soft", "kmip"] = "module"
    #: kmip: the server and how to reach it (type "kmip" only)
    kmip: KmipConfig | None = None
    #: path of the vendor PKCS#11 module (type "module" only)
    module: str = ""
    #: soft token: its SQLite file (absolute path; created on first start)
    path: str = ""
    #: soft token: the label given by unattended initialisation (C_InitToken sets its own)
    label: str = Field(default="soft", max_length=32)
    #: soft token: files holding the SO and user PINs, read once at the first start of an
    #: uninitialised token to initialise it unattended (both or neither)
    init_so_pin_file: str | None = None
    init_user_pin_file: str | None = None
    #: soft token: a file of 32 random bytes (or 64 hex digits, mode 0600) kept apart from
    #: the database; every PIN-derived key is bound to it, so the database alone opens
    #: nothing even with the PINs. A token made with a key file needs it ever after.
    key_file: str | None = None
    #: soft token, layered: the shared object sets (see docs/layers.md)
    layers: list[LayerFileConfig] = Field(default_factory=list, max_length=MAX_LAYERS)
    #: soft token, layered: directory of the per-identity layers 0 (one file each)
    own_layer_dir: str | None = None
    #: "process": load the module in a supervised `p11gate worker` process;
    #: "none": load it into the gateway and call it from a thread pool
    isolation: Literal["process", "none"] = "process"
    #: a command that replaces `p11gate worker` (must speak p11-kit RPC on stdin/stdout),
    #: e.g. ["p11-kit", "remote", "/usr/lib/softhsm/libsofthsm2.so"]
    worker_command: list[str] | None = None
    #: deadline of one call into the module, seconds; past it the worker is killed
    call_timeout: float = Field(default=30.0, gt=0)
    #: threads calling into the module (in the worker, or in-process)
    threads: int = Field(default=4, ge=1, le=256)
    #: isolation = "none": what kind of thread calls the module. "native": POSIX threads
    #: of a small C executor built on first use (no GIL hand-off per call; the back end
    #: refuses to start without it); "threads": Python threads; "auto": native where it
    #: can be built (a C compiler, LP64 x86_64/aarch64), else Python threads
    executor: Literal["auto", "native", "threads"] = "auto"
    #: string passed as pReserved of C_Initialize (p11-kit's x-init-reserved)
    init_reserved: str | None = None
    #: extra environment for the worker (e.g. SOFTHSM2_CONF)
    env: dict[str, str] = Field(default_factory=dict)
    #: seconds between restart attempts of a dead worker
    restart_delay: float = Field(default=0.2, ge=0)
    #: vendor mechanisms (>= CKM_VENDOR_DEFINED 0x80000000) whose parameter is passed to
    #: the module as the client's raw bytes: list one only when the vendor documents its
    #: parameter as a struct without pointers (others get CKR_MECHANISM_PARAM_INVALID)
    raw_parameter_mechanisms: list[int] = Field(default_factory=list)
    #: fair share: calls of one identity in flight on this backend at once (default
    #: threads - 1, at least 1), so that one tenant never holds every thread; its
    #: further calls wait in a queue while other identities' calls go ahead. All
    #: identities together have at most ``threads`` calls in flight (fair_share.py)
    max_calls_per_identity: int | None = Field(default=None, ge=1, le=256)
    #: calls of one identity waiting for its share; beyond, CKR_FUNCTION_FAILED
    max_queued_per_identity: int = Field(default=4096, ge=0, le=1 << 20)
    #: deadline of C_GenerateKey/C_GenerateKeyPair (key and parameter generation is
    #: slow by nature), seconds; other calls have call_timeout
    keygen_timeout: float = Field(default=300.0, gt=0)
    #: largest keys a client may generate; beyond, CKR_KEY_SIZE_RANGE
    max_key_bits: KeyBitsConfig = Field(default_factory=KeyBitsConfig)

    @model_validator(mode="after")
    def _type_keys(self) -> BackendConfig:
        if self.executor != "auto" and (self.type != "module" or self.isolation != "none"):
            raise ValueError(f"executor = \"{self.executor}\": the kind of module thread is "
                             "chosen only for isolation = \"none\" (a worker process calls "
                             "the module from its own threads)")
        if self.type == "module":
            if not self.module:
                raise ValueError("module: give the absolute path of the vendor module "
                                 "(or set type = \"soft\" for the built-in token)")
            if (self.path or self.init_so_pin_file or self.init_user_pin_file or self.layered
                    or self.key_file):
                raise ValueError("path, init_*_pin_file, key_file, layers and own_layer_dir "
                                 "are keys of type = \"soft\"")
            if self.kmip is not None:
                raise ValueError("[backend.kmip] is for type = \"kmip\"")
            return self
        if self.type == "kmip":
            if self.kmip is None:
                raise ValueError("type = \"kmip\" needs a [backend.kmip] section (host, cert, "
                                 "key, ca, pin_file)")
            if (self.module or self.worker_command or self.path or self.layered
                    or self.key_file or self.init_so_pin_file or self.init_user_pin_file):
                raise ValueError("type = \"kmip\" takes no module, worker_command, path, "
                                 "key_file, init_*_pin_file or layers")
            return self
        if self.kmip is not None:
            raise ValueError("[backend.kmip] is for type = \"kmip\"")
        if self.module or self.worker_command:
            raise ValueError("type = \"soft\" takes no module or worker_command")
        if self.layered:
            self._check_layered()
        elif not os.path.isabs(self.path):
            raise ValueError(f"path: {self.path!r}: give the absolute path of the "
                             "soft token's SQLite file")
        if (self.init_so_pin_file is None) != (self.init_user_pin_file is None):
            raise ValueError("give both init_so_pin_file and init_user_pin_file, or neither")
        for f in (self.init_so_pin_file, self.init_user_pin_file):
            if f is not None and not os.path.isabs(f):
                raise ValueError(f"{f!r}: give the absolute path of the PIN file")
        if self.key_file is not None and not os.path.isabs(self.key_file):
            raise ValueError(f"key_file: {self.key_file!r}: give an absolute path")
        return self

    @property
    def layered(self) -> bool:
        return bool(self.layers) or self.own_layer_dir is not None

    def _check_layered(self) -> None:
        if self.path:
            raise ValueError("a layered soft token has no path: its objects are in "
                             "layers (and own_layer_dir)")
        if self.init_so_pin_file is None or self.init_user_pin_file is None:
            raise ValueError("a layered soft token needs init_so_pin_file and "
                             "init_user_pin_file: every layer is created with them")
        if self.own_layer_dir is not None and not os.path.isabs(self.own_layer_dir):
            raise ValueError(f"own_layer_dir: {self.own_layer_dir!r}: give an absolute path")
        names = [x.name for x in self.layers]
        paths = [x.path for x in self.layers]
        if len(set(names)) != len(names) or len(set(paths)) != len(paths):
            raise ValueError("layers: names and paths must be unique")

    @model_validator(mode="after")
    def _share_fits(self) -> BackendConfig:
        if self.max_calls_per_identity is not None and self.max_calls_per_identity > self.threads:
            raise ValueError(f"max_calls_per_identity ({self.max_calls_per_identity}) is more "
                             f"than threads ({self.threads}): lower it or raise threads")
        return self

    @property
    def calls_per_identity(self) -> int:
        """The fair share. threads - 1 keeps a thread free for everyone else whatever
        one identity does, and costs a deployment with one application a single thread
        (threads // 2 would cost it half its capacity). With threads = 1 there is
        nothing to share: give a backend that serves several tenants 2 or more."""
        if self.max_calls_per_identity is not None:
            return self.max_calls_per_identity
        return max(1, self.threads - 1)

    @field_validator("module")
    @classmethod
    def _module_exists(cls, v: str) -> str:
        if not v:
            return v
        if not os.path.isabs(v):
            raise ValueError(f"{v!r}: give the absolute path of the module")
        if not os.path.exists(v):
            raise ValueError(f"{v!r} does not exist: install the vendor module or fix the path")
        return v

    @field_validator("raw_parameter_mechanisms")
    @classmethod
    def _vendor_mechanisms(cls, v: list[int]) -> list[int]:
        from .codec.param_kinds import check_vendor_list

        return check_vendor_list(v)


class LayerGrantConfig(_Strict):
    #: the [[rule]] whose identity match (uid, gid, subject, san, issuer, everyone) applies
    rule: str
    #: "ro": read only; "rw": read and write; "cow": read, and a change makes a private
    #: copy in the identity's own layer
    access: Literal["ro", "rw", "cow"] = "ro"


class TokenLayerConfig(_Strict):
    #: a layer of the token's soft back end
    layer: str
    #: tried in order, the first whose rule matches the identity decides; none: the
    #: identity does not see this layer
    grant: list[LayerGrantConfig] = Field(min_length=1)


class TokenConfig(_Strict):
    #: the label clients see (≤ 32 bytes)
    name: str = Field(min_length=1, max_length=32)
    backend: str
    select: TokenSelect = Field(default_factory=lambda: TokenSelect(slot_index=0))
    #: client-visible slot id; derived from the name when not given (stable across restarts)
    slot_id: int | None = Field(default=None, ge=1, le=0x7FFFFFFF)
    #: PIN handling: "passthrough" (the client's PIN goes to the backend), "mapped" (each
    #: identity has its own PIN; the gateway logs in with backend_pin_file/env), "none"
    #: (identity suffices; C_Login takes any PIN; the gateway logs in with the credential)
    pin_mode: Literal["passthrough", "mapped", "none"] = "passthrough"
    #: file holding the backend's user PIN (mapped/none); trailing newline ignored
    backend_pin_file: str | None = None
    #: environment variable holding the backend's user PIN (mapped/none)
    backend_pin_env: str | None = None
    #: mapped mode: identity key ("uid:1001", "cert:CN=app1,O=Example") → PIN hash made
    #: with `p11gate hash-pin`
    pins: dict[str, str] = Field(default_factory=dict)
    #: wrong PINs in a row (per identity) before a lock-out
    max_pin_failures: int = Field(default=5, ge=1)
    #: first lock-out, seconds; it doubles at each further lock-out (up to an hour)
    pin_lockout: float = Field(default=30.0, ge=0)
    #: layered soft token: its layers under layer 0, top first (see docs/layers.md)
    layers: list[TokenLayerConfig] = Field(default_factory=list)
    #: layered soft token: the rules whose identities get a layer 0 of their own
    #: ("*": every identity; none: no layer 0)
    own_layer: list[str] = Field(default_factory=list)
    #: layered soft token: offered uninitialised; C_InitToken on it makes a new token of
    #: the caller's own (in a new slot) -- at most this many per identity (0: not offered)
    client_tokens: int = Field(default=0, ge=0, le=64)
    #: wrap only with secret keys made on the token that may not decrypt, decrypt only
    #: with keys that may not wrap, roles fixed, unwrapped keys sensitive, no derivation
    #: that reveals its base key (frontend/key_separation.py)
    key_separation: bool = False

    @model_validator(mode="after")
    def _pin_source(self) -> TokenConfig:
        from .frontend.pins import valid_hash

        has_source = self.backend_pin_file is not None or self.backend_pin_env is not None
        if self.pin_mode == "passthrough":
            if has_source or self.pins:
                raise ValueError("backend_pin_file/backend_pin_env/pins are for pin_mode "
                                 "'mapped' or 'none'")
        elif not has_source:
            raise ValueError(f"pin_mode {self.pin_mode!r} needs backend_pin_file or "
                             "backend_pin_env (the credential the gateway logs in with)")
        if self.backend_pin_file is not None and not os.path.isfile(self.backend_pin_file):
            raise ValueError(f"backend_pin_file {self.backend_pin_file!r} does not exist")
        for who, h in self.pins.items():
            if not valid_hash(h):
                raise ValueError(f"pins[{who!r}]: not a PIN hash; make one with "
                                 "`p11gate hash-pin`")
        if self.pins and self.pin_mode != "mapped":
            raise ValueError("pins are only used with pin_mode = 'mapped'")
        return self

    @field_validator("backend_pin_env")
    @classmethod
    def _pin_env_private(cls, v: str | None) -> str | None:
        from .backends.worker_env import INHERITED

        if v is not None and v in INHERITED:
            raise ValueError(f"{v!r} is passed on to every worker process: keep the backend "
                             "PIN in a variable of its own (e.g. HSM_PIN)")
        return v

    def backend_pin(self) -> bytes:
        """The credential for mapped/none tokens (read when needed, never logged)."""
        if self.backend_pin_file is not None:
            return Path(self.backend_pin_file).read_bytes().rstrip(b"\r\n")
        assert self.backend_pin_env is not None
        value = os.environ.get(self.backend_pin_env)
        if value is None:
            raise ConfigError(f"token {self.name!r}: environment variable "
                              f"{self.backend_pin_env} (backend_pin_env) is not set")
        return value.encode()

    @property
    def virtual_slot_id(self) -> int:
        if self.slot_id is not None:
            return self.slot_id
        return stable_slot_id(self.name)


def stable_slot_id(name: str) -> int:
    """A slot id derived from the token name: the same on every restart and every node."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") & 0x7FFFFFFF
    return h or 1


class AuditConfig(_Strict):
    #: append-only JSON lines; default <state_dir>/audit.jsonl
    file: str | None = None
    enabled: bool = True
    #: fail closed: an audited operation whose record cannot be written (full disk, I/O
    #: error) fails with CKR_DEVICE_MEMORY / CKR_DEVICE_ERROR; false = log and go on
    required: bool = True


class Config(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    backend: Annotated[list[BackendConfig], Field(min_length=1)]
    token: Annotated[list[TokenConfig], Field(min_length=1)]
    #: access rules, tried in order (see policy/rules.py); none = open to every client
    rule: list[RuleConfig] = Field(default_factory=list)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    #: certificates for `tls:` listeners
    tls: TlsConfig | None = None
    #: tokens served by several equivalent members
    pool: list[PoolConfig] = Field(default_factory=list)
    #: the Prometheus endpoint (off unless [metrics] listen is set)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    #: the shared state store (SQLite in state_dir unless [state] says otherwise)
    state: StateConfig = Field(default_factory=StateConfig)
    #: the file this came from, for messages
    source: str = "<config>"

    @model_validator(mode="after")
    def _references(self) -> Config:
        # every problem in one run (one line each), not only the first
        problems: list[str] = []
        backends = [b.name for b in self.backend]
        names = backends + [p.name for p in self.pool]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            problems.append(f"backend and pool names must be unique: {sorted(dup)}")
        for i, p in enumerate(self.pool):
            for j, m in enumerate(p.members):
                if m.backend not in backends:
                    problems.append(f"pool[{i}].members[{j}].backend: no backend named "
                                    f"{m.backend!r} (defined: {', '.join(backends)})")
        for i, t in enumerate(self.token):
            if t.backend not in names:
                problems.append(
                    f"token[{i}].backend: no backend or pool named {t.backend!r} (defined: "
                    f"{', '.join(names)})"
                )
        tnames = [t.name for t in self.token]
        dup = {n for n in tnames if tnames.count(n) > 1}
        if dup:
            problems.append(f"token names must be unique: {sorted(dup)} given twice")
        if self.tls is None and any(a.startswith("tls:") for a in self.server.listen):
            problems.append("server.listen has a tls: address but there is no [tls] section "
                            "(cert, key, client_ca)")
        for i, r in enumerate(self.rule):
            for name in r.tokens:
                if name != "*" and name not in tnames:
                    problems.append(f"rule[{i}] ({r.name}).tokens: no token named {name!r} "
                                    f"(defined: {', '.join(tnames)})")
        rnames = [r.name for r in self.rule]
        dup = {n for n in rnames if rnames.count(n) > 1}
        if dup:
            problems.append(f"rule names must be unique (logs and audit name them): "
                            f"{sorted(dup)} given twice")
        problems += _layer_problems(self)
        ids = [t.virtual_slot_id for t in self.token]
        same = sorted(t.name for t in self.token if ids.count(t.virtual_slot_id) > 1)
        if same:
            problems.append(f"tokens {same} have the same slot id: set slot_id on one of "
                            "them")
        if problems:
            raise ValueError("\n".join(problems))
        for b in self.backend:  # the KMIP identity map lives with the registry
            secret_var = b.kmip.password_env if b.kmip is not None else None
            for o in self.backend:
                if secret_var is not None and secret_var in o.env:
                    raise ValueError(f"backend {o.name!r}: env sets {secret_var}, the "
                                     f"KMIP password_env of backend {b.name!r}: the worker "
                                     "would see the password; remove it from env")
            if b.kmip is not None and not b.kmip.idmap_path:
                b.kmip.idmap_path = os.path.join(self.server.state_dir,
                                                 f"kmip-{b.name}.sqlite")
        return self

    @model_validator(mode="after")
    def _pin_env_not_exported(self) -> Config:
        # a worker gets its backend's env: that must not hand it a backend PIN
        pin_vars = {t.backend_pin_env: t.name for t in self.token if t.backend_pin_env}
        for i, b in enumerate(self.backend):
            for var in b.env:
                if var in pin_vars:
                    raise ValueError(f"backend[{i}].env sets {var}, the backend_pin_env of "
                                     f"token {pin_vars[var]!r}: the worker would see the "
                                     "backend PIN; remove it from env")
        return self

    def backend_named(self, name: str) -> BackendConfig:
        return next(b for b in self.backend if b.name == name)


def _layer_problems(cfg: Config) -> list[str]:
    problems: list[str] = []
    rules = {r.name for r in cfg.rule}
    backends = {b.name: b for b in cfg.backend}
    layered = [b.name for b in cfg.backend if b.layered]
    if layered and cfg.server.process_count() > 1:
        # each process would keep the layers in its own memory and never see another's
        # changes: an object destroyed through one (a key revoked) stays usable through
        # the others until they restart, and per-identity bounds count per process
        problems.append(f"backend {layered[0]!r}: a layered soft token is served by one "
                        "process: set [server] processes = 1")
    for i, t in enumerate(cfg.token):
        if not (t.layers or t.own_layer or t.client_tokens):
            continue
        b = backends.get(t.backend)
        if b is None or not b.layered:
            problems.append(f"token[{i}].layers: backend {t.backend!r} is not a layered "
                            "soft token (give it layers or own_layer_dir)")
            continue
        if t.pin_mode == "passthrough":
            problems.append(f"token[{i}]: a layered token needs pin_mode 'none' or "
                            "'mapped' (the gateway unlocks every layer)")
        known = {x.name for x in b.layers}
        for j, tl in enumerate(t.layers):
            if tl.layer not in known:
                problems.append(f"token[{i}].layers[{j}]: no layer {tl.layer!r} in backend "
                                f"{b.name!r}")
            for g in tl.grant:
                if g.rule not in rules:
                    problems.append(f"token[{i}].layers[{j}].grant: no rule {g.rule!r}")
        for r in t.own_layer:
            if r != "*" and r not in rules:
                problems.append(f"token[{i}].own_layer: no rule {r!r}")
        if (t.own_layer or t.client_tokens) and b.own_layer_dir is None:
            problems.append(f"token[{i}].own_layer: backend {b.name!r} has no own_layer_dir")
    return problems


def load_config(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return parse_config(raw, str(p))


def parse_config(raw: dict[str, object], source: str = "<config>") -> Config:
    try:
        return Config.model_validate({**raw, "source": source})
    except ValidationError as e:
        raise ConfigError(_explain(source, e)) from None


def _explain(source: str, e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(
            f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]
        ).replace(".[", "[")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the configuration reference in README)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        # a validator that found several problems says each on a line of its own
        lines += [f"{source}: {loc or '(top level)'}: {m}" for m in msg.split("\n")]
    return "\n".join(lines)
