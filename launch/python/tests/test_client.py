"""kvfabric.Client against a live build/bin/kvfabric-serve (coordinator only, port 0)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import kvfabric
from kvfabric.client import PlanTable

from conftest import TINY_YAML

DP2_YAML = TINY_YAML.replace("dp: 1", "dp: 2")


def test_every_op(start_server):
    server = start_server(DP2_YAML)
    with kvfabric.Client.connect(server.host, server.port) as client:
        hello = client.server
        assert (hello.protocol, hello.model, hello.dp, hello.block_size) == (1, "py-tiny", 2, 16)
        assert hello.admin and hello.tenant == ""
        placed = client.admit(1, list(range(40)))
        assert (placed.replica, placed.cached_tokens, len(placed.blocks)) == (0, 0, 3)
        step = client.step()
        assert step.step == 0 and step.ops == {"swap_out": 0, "migrate": 0, "swap_in": 0, "copy": 0}
        assert step.tables == [PlanTable(1, 0, 40, 0, 0, placed.blocks)]
        assert client.fork(1, 2, replica=1) == 1
        client.append(2, 1)
        client.set_priority(2, 3)
        step = client.step()
        assert step.ops["migrate"] == 3 and {t.seq for t in step.tables} == {2}
        assert client.query(2).replica == 1 and not client.query(2).swapped
        costs = client.admission_costs(list(range(40)))
        assert [r.replica for r in costs.replicas] == [0, 1]
        assert costs.replicas[0].cached_tokens == 32 and costs.replicas[0].migration_source is None
        assert all(r.accepts and r.has_room for r in costs.replicas)
        assert costs.chosen == min(costs.replicas, key=lambda r: (r.cost, r.replica)).replica
        client.free(1)
        assert client.step().released == [1]
        stats = client.stats()
        assert stats["admitted"] == 1 and stats["steps"] == 3 and len(stats["replicas"]) == 2
        client.shutdown()
    assert server.wait() == 0


def test_compression_is_admitted_scored_and_compacted(server):
    with kvfabric.Client.connect(server.host, server.port) as client:
        client.admit(1, list(range(80)), compression={
            "policy": "h2o", "budget_tokens": 32, "recent_tokens": 8, "interval_steps": 1})
        assert client.step().score_requests == []  # the prefill
        client.append(1, 1)
        scored = client.step()
        assert scored.score_requests == [1]
        scores = [0.0] * 81
        scores[40] = 5.0
        with pytest.raises(kvfabric.InvalidArgumentError, match="outstanding request is step"):
            client.report_attention(1, scored.step - 1, scores)
        client.report_attention(1, scored.step, scores)
        client.append(1, 1)
        step = client.step()
        (compaction,) = step.compactions
        assert (compaction.seq, compaction.tokens_before) == (1, 82)
        assert sum(count for _, count in compaction.kept) == 32
        assert (40, 1) in compaction.kept
        assert [t.num_tokens for t in step.tables] == [32]
        with pytest.raises(kvfabric.InvalidArgumentError, match="budget_ratio"):
            client.admit(2, list(range(80)), compression={"policy": "h2o", "budget_ratio": 2.0})
        with pytest.raises(kvfabric.InvalidArgumentError, match="element 0"):
            client.report_attention(1, scored.step, [-1.0])


def test_an_identical_snapkv_request_starts_from_the_compacted_prompt(server):
    snapkv = {"policy": "snapkv", "budget_tokens": 10, "window_tokens": 4}
    prompt = [7 + 3 * i for i in range(70)]
    with kvfabric.Client.connect(server.host, server.port) as client:
        first = client.admit(11, prompt, compression=snapkv)
        assert first.compressed_tokens == 0
        client.step()  # the prefill
        scored = client.step()
        assert scored.score_requests == [11]
        client.report_attention(11, scored.step, [1.0] * 70)
        (compaction,) = client.step().compactions
        assert compaction.seq == 11
        shared = client.admit(12, prompt, compression=snapkv)
        # a budget of 10 kept in whole 16-token blocks; nothing to prefill
        assert (shared.compressed_tokens, shared.cached_tokens) == (16, 70)
        assert len(shared.blocks) == 1
        assert client.admit(13, prompt, compression=dict(snapkv, budget_tokens=20)).compressed_tokens == 0
        assert client.stats()["compressed_hits"] == 1
        for seq in (11, 12, 13):
            client.free(seq)
        client.step()


def test_errors_carry_the_servers_code_and_message(server):
    with kvfabric.Client.connect(server.host, server.port) as client:
        with pytest.raises(kvfabric.SequenceNotFoundError) as missing:
            client.append(9, 1)
        assert missing.value.code == "SequenceNotFound"
        assert missing.value.message == "Sequence not found: S9"
        with pytest.raises(kvfabric.InvalidArgumentError) as bad:
            client.admit(-2, [1, 2, 3])
        assert 'field "seq"' in bad.value.message and "(got -2)" in bad.value.message
        with pytest.raises(kvfabric.Error) as unknown:
            client.request("no_such_op")
        assert unknown.value.code == "InvalidArgument" and "no_such_op" in unknown.value.message
        # Refused before sending, by name (a float token id was truncated and admitted; a NumPy
        # integer could not be sent; a NaN score reached the server as invalid JSON).
        with pytest.raises(kvfabric.InvalidArgumentError, match=r"tokens\[0\] must be an integer"):
            client.admit(7, [1.7, 2.2])
        with pytest.raises(kvfabric.InvalidArgumentError, match=r"scores\[1\] = nan"):
            client.report_attention(7, 0, [1.0, float("nan")])
        with pytest.raises(kvfabric.InvalidArgumentError, match=r"scores\[0\] must be a number"):
            client.report_attention(7, 0, ["x"])
        # A refused request changed nothing: the connection and the coordinator carry on.
        assert client.admit(1, [1, 2, 3]).replica == 0
        assert client.stats()["admitted"] == 1
        np = pytest.importorskip("numpy")
        assert client.admit(np.int64(2), np.arange(3, dtype=np.int32)).replica == 0
        client.append(np.uint32(2), np.int64(1))
        assert client.query(2).replica == 0


def test_batch_replies_in_order_and_returns_refusals(server):
    with kvfabric.Client.connect(server.host, server.port) as client:
        batch = kvfabric.Batch()
        batch.admit(1, list(range(20)))
        batch.append(77, 1)
        batch.step()
        batch.query(1)
        replies = client.batch(batch)
        assert len(replies) == 4
        assert replies[0]["blocks"] == [0, 1]
        assert isinstance(replies[1], kvfabric.SequenceNotFoundError)
        assert replies[2]["step"] == 0 and replies[3]["replica"] == 0
        replies = client.batch([{"op": "stats"}, {"op": "free", "seq": 1}])
        assert replies[0]["admitted"] == 1 and replies[1] == {"ok": True}


def test_the_native_module_is_not_needed():
    # The client and the errors are pure Python: importing them with the native module blocked
    # works, and a native name says why it is missing.
    code = (
        "import sys; sys.modules['kvfabric._native'] = None\n"
        "import kvfabric\n"
        "assert kvfabric.Client and kvfabric.Error\n"
        "try:\n    kvfabric.Coordinator\nexcept ImportError as e:\n    print('ImportError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "kvfabric.Coordinator needs the native module" in out.stdout


TENANTS = """\
tenants:
  - name: scheduler
    token: "scheduler-token-0123456789"
    admin: true
  - name: team-a
    token: "team-a-token-0123456789"
    max_sequences: 1
"""


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl tool")
def test_tenants_tokens_and_tls(start_server, tmp_path):
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    (tmp_path / "tenants.yaml").write_text(TENANTS)
    server = start_server(TINY_YAML + f"server: {{tenants_file: {tmp_path / 'tenants.yaml'}, "
                          f"tls_cert_file: {cert}, tls_key_file: {key}}}\n")
    assert "TLS" in server.output

    with pytest.raises(kvfabric.UnauthenticatedError, match="needs a token"):
        kvfabric.Client.connect(server.host, server.port, tls=str(cert))
    with pytest.raises(kvfabric.UnauthenticatedError, match="not valid"):
        kvfabric.Client.connect(server.host, server.port, token="wrong-token-0123456789",
                                tls=str(cert))
    # Plain TCP to a TLS server: it closes the connection (or resets it) instead of replying.
    with pytest.raises((kvfabric.UnavailableError, ConnectionError)):
        kvfabric.Client.connect(server.host, server.port, token="team-a-token-0123456789",
                                timeout=5)

    with kvfabric.Client.connect(server.host, server.port, token="team-a-token-0123456789",
                                 tls=str(cert)) as team_a:
        assert team_a.server.tenant == "team-a" and not team_a.server.admin
        team_a.admit(1, list(range(20)))
        with pytest.raises(kvfabric.ResourceExhaustedError, match="max_sequences"):
            team_a.admit(2, list(range(20)))
        with pytest.raises(kvfabric.PermissionDeniedError):
            team_a.step()
        with kvfabric.Client.connect(server.host, server.port, token="scheduler-token-0123456789",
                                     tls=str(cert)) as admin:
            assert admin.server.admin
            assert admin.step().tables[0].seq == 1
            admin.admit(5, [1, 2, 3])
        # Another tenant's sequence answers as an unknown one.
        with pytest.raises(kvfabric.SequenceNotFoundError):
            team_a.query(5)
