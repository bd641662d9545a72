"""Issue 3, gateway replication: objects made through the pool exist on every member;
generated keys are copied by wrap/unwrap under the pool's wrapping key, or stay pinned
to their member when they may not be wrapped; destructions reach members that missed
them."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pkcs11  # before forking client processes
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from tests.gateway_proc import CLIENT_MODULE, Gateway, RawClient, wait_for
from tests.pools.members import PIN, key_material, make_member, pool_config

from p11gate.admin import query
from p11gate.codec import Attribute, Mechanism, ReplyError, ckr

WRAP_VALUE = bytes(range(32))


def _client(address: str, action: str, label: str, q: Any) -> None:
    os.environ["P11_KIT_SERVER_ADDRESS"] = address
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11.util.ec import encode_named_curve_parameters

    try:
        token = pkcs11.lib(CLIENT_MODULE).get_token(token_label="ha-token")
        with token.open(user_pin=PIN, rw=True) as s:
            if action == "wrapping-key":
                s.create_object({
                    Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                    Attribute.VALUE: WRAP_VALUE, Attribute.TOKEN: True, Attribute.LABEL: label,
                    Attribute.WRAP: True, Attribute.UNWRAP: True, Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False, Attribute.PRIVATE: True})
                q.put(("ok", None))
            elif action in ("movable", "stuck"):
                params = s.create_domain_parameters(KeyType.EC, {
                    Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                    local=True)
                params.generate_keypair(
                    store=True, label=label, id=label.encode(),
                    private_template={Attribute.EXTRACTABLE: action == "movable",
                                      Attribute.SENSITIVE: True})
                q.put(("ok", None))
            elif action == "data":
                s.create_object({Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True,
                                 Attribute.LABEL: label, Attribute.VALUE: b"x",
                                 Attribute.PRIVATE: False})
                q.put(("ok", None))
            elif action == "disable-sign":
                s.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)[
                    Attribute.SIGN] = False
                q.put(("ok", None))
            elif action == "destroy":
                for o in s.get_objects({Attribute.LABEL: label}):
                    o.destroy()
                q.put(("ok", None))
            elif action == "sign":
                priv = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
                pub = s.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label)
                digest = hashlib.sha256(b"replicated").digest()
                sig = priv.sign(digest, mechanism=Mechanism.ECDSA)
                q.put(("ok", (sig, bytes(pub[Attribute.EC_POINT]))))
    except Exception as e:
        q.put(("error", repr(e)))


def provision_wrapping_key(gw: Gateway, label: str) -> None:
    c = RawClient(gw.path)
    try:
        c.initialize()
        (slots,) = c.call(4, [1, 4])
        (sess,) = c.call(10, [slots[0], 6])
        c.call(18, [sess, 1, PIN.encode()])
        c.call(20, [sess, [Attribute(0x0, 4, 8), Attribute(0x100, 0x1F, 8),
                           Attribute(0x11, WRAP_VALUE, 32), Attribute(0x1, 1, 1),
                           Attribute(0x3, label.encode(), len(label)),
                           Attribute(0x106, 1, 1), Attribute(0x107, 1, 1),
                           Attribute(0x103, 1, 1), Attribute(0x162, 0, 1),
                           Attribute(0x2, 1, 1)]])
    finally:
        c.close()


def client(gw: Gateway, action: str, label: str) -> tuple[str, Any]:
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_client, args=(gw.address, action, label, q))
    p.start()
    try:
        return q.get(timeout=120)  # type: ignore[no-any-return]
    finally:
        p.join(10)


def verify(result: tuple[bytes, bytes]) -> None:
    sig, point = result
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point[2:])
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    key.verify(der, hashlib.sha256(b"replicated").digest(), ec.ECDSA(Prehashed(hashes.SHA256())))


def labels_on(member: dict[str, Any]) -> str:
    """What the member's token holds, read directly (also while the gateway cannot
    reach it: its configuration file is then moved aside)."""
    conf = Path(member["conf"])
    if not conf.exists():
        conf = conf.with_suffix(".away")
    r = subprocess.run(["pkcs11-tool", "--module", member["module"], "--token-label",
                        member["label"], "--login", "--pin", PIN, "-O"],
                       env={**member["env"], "SOFTHSM2_CONF": str(conf)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def pool_status_of(admin: str) -> dict[str, Any]:
    return dict(query(admin)["pools"][0])


def take_member_down(members: list[dict[str, Any]], admin: str, name: str) -> None:
    """Kill the member's worker with its configuration moved aside: it stays down."""
    i = int(name[1:])
    conf = Path(members[i]["conf"])
    shutil.move(conf, conf.with_suffix(".away"))  # its restart will fail
    pid = next(b["pid"] for b in query(admin)["backends"] if b["name"] == name)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: pool_status_of(admin)["members"][i]["state"] == "down", timeout=10)


def bring_member_back(members: list[dict[str, Any]], admin: str, name: str) -> None:
    i = int(name[1:])
    conf = Path(members[i]["conf"])
    shutil.move(conf.with_suffix(".away"), conf)
    assert wait_for(lambda: pool_status_of(admin)["members"][i]["state"] == "up", timeout=20)


def test_gateway_replication_copies_keys_pins_unwrappable_ones_and_catches_up(
    tmp_path: Path,
) -> None:
    members = [make_member(tmp_path, i, None) for i in range(3)]
    cfg = pool_config(tmp_path, members, call_timeout=2.0,
                      extra_pool='replication = "gateway"\nwrapping_key = "pool-wrap"')
    gw = Gateway(cfg)
    admin = str(tmp_path / "state" / "admin.sock")

    def pool_status() -> dict[str, Any]:
        return pool_status_of(admin)

    def take_down(name: str) -> None:
        take_member_down(members, admin, name)

    def bring_back(name: str) -> None:
        bring_member_back(members, admin, name)

    try:
        # provisioned through the pool (a deterministic creation: on every member) by a
        # raw C_CreateObject: the pool's wrapping key is invisible to clients afterwards,
        # so a library that reads back what it made (python-pkcs11) cannot be used
        provision_wrapping_key(gw, "pool-wrap")
        assert client(gw, "data", "temporary") == ("ok", None)
        for m in members:  # deterministic creations: on every member
            listing = labels_on(m)
            assert "pool-wrap" in listing and "temporary" in listing
        assert client(gw, "movable", "movable") == ("ok", None)
        assert client(gw, "stuck", "stuck") == ("ok", None)
        st = pool_status()
        made = {o["label"]: o for o in st["made_through_pool"]}
        origin_movable = made["movable"]["origin"]
        origin_stuck = made["stuck"]["origin"]
        # the extractable key is on every member; the other only where it was made
        for i, m in enumerate(members):
            listing = labels_on(m)
            assert listing.count("label:      movable") == 2  # private and public key
            assert ("Private Key Object; EC\n  label:      stuck" in listing) == (
                f"m{i}" == origin_stuck)
        assert [(p["label"], p["member"]) for p in st["pinned_objects"]] == [
            ("stuck", origin_stuck)]
        status, res = client(gw, "sign", "stuck")
        assert status == "ok", res
        verify(res)

        # the member that generated the movable key dies: the key still works
        take_down(origin_movable)
        status, res = client(gw, "sign", "movable")
        assert status == "ok", res
        verify(res)
        # the pinned key's member dies too: a clear error, never another member's key
        if origin_stuck != origin_movable:
            take_down(origin_stuck)
        status, res = client(gw, "sign", "stuck")
        assert status == "error" and "DeviceError" in res, res
        pinned_logs = [json.loads(line) for line in gw.log().splitlines()
                       if "object pinned to a member that is down" in line]
        assert pinned_logs and pinned_logs[-1]["member"] == origin_stuck
        status, res = client(gw, "sign", "movable")
        assert status == "ok", res

        # a destruction while a member is away reaches it when it returns
        down = sorted({origin_movable, origin_stuck})
        assert client(gw, "destroy", "temporary") == ("ok", None)
        for name in down:  # still there: they were away
            assert "temporary" in labels_on(members[int(name[1:])])
        for name in down:
            bring_back(name)
        assert wait_for(lambda: all("temporary" not in labels_on(m) for m in members),
                        timeout=10)
        assert "member caught up: destroyed an object it missed" in gw.log()
        status, res = client(gw, "sign", "stuck")  # its member is back
        assert status == "ok", res
        verify(res)
    finally:
        gw.stop()


def private_key_signs(member: dict[str, Any]) -> bool:
    """The member's own ec1 private key has CKA_SIGN (pkcs11-tool's Usage line)."""
    block = labels_on(member).split("Private Key Object", 1)[1].split("Object;", 1)[0]
    usage = next(line for line in block.splitlines() if "Usage:" in line)
    return "sign" in usage.split(":", 1)[1].replace(" ", "").split(",")


def raw_sign(gw: Gateway) -> int:
    """Sign with ec1 straight through the RPC (a PKCS#11 library would check CKA_SIGN
    itself first): CKR_OK or the error the gateway answered."""
    c = RawClient(gw.path)
    try:
        c.initialize()
        (slots,) = c.call(4, [1, 4])
        (sess,) = c.call(10, [slots[0], 6])
        c.call(18, [sess, 1, PIN.encode()])
        found = c.find(sess, [Attribute(0, 3, 8), Attribute(3, b"ec1", 3)])
        assert len(found) == 1, found
        c.call(42, [sess, Mechanism(0x1041, None), found[0]])  # CKM_ECDSA
        (sig,) = c.call(43, [sess, bytes(32), 128])
        assert len(sig) == 64
        return ckr.OK
    except ReplyError as e:
        return e.rv
    finally:
        c.close()


def test_a_member_that_missed_a_change_never_serves_its_old_copy(tmp_path: Path) -> None:
    """CKA_SIGN is turned off while m2 is away. m2 comes back with a key that still
    signs; with only m2 up, signing must fail rather than use that copy, and once an
    up-to-date member is back the answer is CKR_KEY_FUNCTION_NOT_PERMITTED."""
    keys = key_material(tmp_path / "keys", rsa_key=False)
    members = [make_member(tmp_path, i, keys) for i in range(3)]  # ec1 on each
    gw = Gateway(pool_config(tmp_path, members, extra_pool='replication = "gateway"'))
    admin = str(tmp_path / "state" / "admin.sock")
    try:
        assert raw_sign(gw) == ckr.OK
        take_member_down(members, admin, "m2")
        assert client(gw, "disable-sign", "ec1") == ("ok", None)
        assert [m["stale_objects"] for m in pool_status_of(admin)["members"]] == [0, 0, 1]
        assert "member missed a creation or change" in gw.log()
        assert raw_sign(gw) == ckr.KEY_FUNCTION_NOT_PERMITTED

        bring_member_back(members, admin, "m2")
        assert "kept out of rotation for objects it missed changes to" in gw.log()
        assert private_key_signs(members[2])  # the danger is real
        take_member_down(members, admin, "m0")
        take_member_down(members, admin, "m1")
        assert raw_sign(gw) == ckr.DEVICE_ERROR  # not a signature
        assert private_key_signs(members[2])  # untouched, just not used

        bring_member_back(members, admin, "m0")
        assert raw_sign(gw) == ckr.KEY_FUNCTION_NOT_PERMITTED
        # the stale mark is in the registry: it outlives a gateway restart
        gw.stop()
        gw = Gateway(pool_config(tmp_path, members, extra_pool='replication = "gateway"'))
        assert pool_status_of(admin)["members"][2]["stale_objects"] == 1
    finally:
        gw.stop()
