"""launch/cluster without starting anything: the mpirun line it builds from hosts, hostfiles and
the environment, the Slurm script, and the errors that stop a job before it starts."""

import os
import shlex
import socket

import pytest


def dry_run_command(result):
    """The one-line command of a --dry-run, split as the shell would."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith("# run folder: ")
    return shlex.split(lines[0])


def option(command, name):
    return command[command.index(name) + 1]


def test_even_hosts_map_the_same_count_per_node(cluster, config, tmp_path):
    result = cluster("--hosts", "a:2,b:2", "--config", str(config), "--name", "even", "--dry-run",
                     "--", "replay", "--max-requests", "40")
    command = dry_run_command(result)
    run_dir = tmp_path / "runs" / "even"
    assert command[:5] == ["mpirun", "-n", "4", "--host", "a:2,b:2"]
    assert option(command, "--map-by") == "ppr:2:node"
    assert option(command, "--bind-to") == "none"
    assert "--tag-output" in command
    assert option(command, "--output-filename") == str(run_dir / "ranks")
    tool = command[command.index("--output-filename") + 2:]
    assert tool[0].endswith("/kvfabric-bench")
    assert tool[1:] == ["--json", str(run_dir / "results.json"), "replay", "--config",
                        str(config), "--dp", "2", "--tp", "2", "--max-requests", "40"]
    assert result.stdout.splitlines()[1] == f"# run folder: {run_dir}"
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_hostfile_with_comments_and_slots_capped_by_gpus_per_node(cluster, config, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two 8-GPU nodes, of which the job uses 2 GPUs each\n"
                        "node1 slots=8   # first\n"
                        "\n"
                        "node2:8 max_slots=8\n")
    result = cluster("--hostfile", str(hostfile), "--gpus-per-node", "2", "--config", str(config),
                     "--dry-run", "--", "serve", "--port", "0")
    command = dry_run_command(result)
    assert command[:5] == ["mpirun", "-n", "4", "--host", "node1:2,node2:2"]
    assert option(command, "--map-by") == "ppr:2:node"
    assert command[-5].endswith("/kvfabric-serve")
    assert command[-4:] == ["--config", str(config), "--port", "0"]


def test_uneven_hosts_fill_in_order(cluster, config):
    uneven = dry_run_command(cluster("--hosts", "a:3,b:1", "--config", str(config), "--dry-run",
                                     "--", "serve"))
    assert uneven[:5] == ["mpirun", "-n", "4", "--host", "a:3,b:1"]
    assert option(uneven, "--map-by") == "slot"
    # More slots than ranks: the first host takes them all, the second is left out.
    first_only = dry_run_command(cluster("--hosts", "a:8,b:8", "--config", str(config),
                                         "--dry-run", "--", "serve"))
    assert first_only[:5] == ["mpirun", "-n", "4", "--host", "a:4"]


def test_too_few_slots_start_nothing(cluster, config, tmp_path):
    result = cluster("--hosts", "a:2,b:1", "--config", str(config), "--", "serve")
    assert result.returncode == 2
    assert "dp 2 x tp 2 needs 4 ranks; the hosts give 3 slots (a: 2, b: 1)" in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "runs").exists()
    # A name without a count holds --gpus-per-node ranks, or one.
    result = cluster("--hosts", "a,b", "--config", str(config), "--", "serve")
    assert result.returncode == 2
    assert "the hosts give 2 slots (a: 1, b: 1)" in result.stderr


def test_forwards_nccl_and_kvfabric_variables_not_open_mpi_ones(cluster, config):
    env = {"NCCL_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "eth0", "UCX_TLS": "rc",
           "CUDA_VISIBLE_DEVICES": "0,1,2,3", "KVF_TOPOLOGY_DP": "1",
           "OMPI_MCA_btl": "self,tcp"}
    command = dry_run_command(cluster("--hosts", "a:2", "--config", str(config), "--dry-run",
                                      "--", "replay", env=env))
    forwarded = [command[i + 1] for i, arg in enumerate(command) if arg == "-x"]
    assert forwarded == ["CUDA_VISIBLE_DEVICES", "KVF_TOPOLOGY_DP", "NCCL_DEBUG",
                         "NCCL_SOCKET_IFNAME", "UCX_TLS"]
    assert not any("OMPI_" in arg for arg in command)
    # KVF_TOPOLOGY_DP=1 is the effective topology: dp 1 x tp 2, 2 ranks.
    assert command[:3] == ["mpirun", "-n", "2"]
    assert command[command.index("--dp") + 1] == "1"


def test_slurm_script(cluster, config, tmp_path):
    result = cluster("--slurm", "--nodes", "2", "--gpus-per-node", "2", "--config", str(config),
                     "--name", "job", "--dry-run", "--", "replay", "--max-requests", "40",
                     env={"NCCL_IB_HCA": "mlx5_0 mlx5_1"})
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "job"
    lines = result.stdout.splitlines()
    assert lines[0] == f"# run folder: {run_dir}"
    assert lines[1] == "#!/bin/bash"
    for line in ["#SBATCH --job-name=job", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --gpus-per-node=2", f"#SBATCH --output={run_dir}/slurm-%j.out",
                 "export NCCL_IB_HCA='mlx5_0 mlx5_1'"]:
        assert line in lines
    srun = shlex.split(next(line for line in lines if line.startswith("srun ")))
    assert srun[:3] == ["srun", "--mpi=pmix", "--kill-on-bad-exit=1"]
    assert f"--output={run_dir}/ranks/rank.%t.stdout" in srun
    tool = srun[srun.index(f"--error={run_dir}/ranks/rank.%t.stderr") + 1:]
    assert tool[0].endswith("/kvfabric-bench")
    assert tool[1:] == ["--json", str(run_dir / "results.json"), "replay", "--config",
                        str(config), "--dp", "2", "--tp", "2", "--max-requests", "40"]
    assert not (tmp_path / "runs").exists()


def test_slurm_tasks_must_match_the_ranks(cluster, config, tmp_path):
    result = cluster("--slurm", "--nodes", "2", "--gpus-per-node", "4", "--config", str(config),
                     "--", "serve")
    assert result.returncode == 2
    assert ("dp 2 x tp 2 needs 4 ranks; --nodes 2 x --gpus-per-node 4 gives 8 tasks"
            in result.stderr)
    assert not (tmp_path / "runs").exists()


def test_submit_without_sbatch_is_a_clear_error(cluster, config, tmp_path):
    empty = tmp_path / "empty-path"
    empty.mkdir()
    result = cluster("--slurm", "--nodes", "1", "--gpus-per-node", "4", "--config", str(config),
                     "--submit", "--", "serve", path=str(empty))
    assert result.returncode == 2
    assert "--submit: sbatch is not on PATH" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_submit_runs_sbatch_on_the_script(cluster, config, tmp_path):
    fake = tmp_path / "fake-bin"
    fake.mkdir()
    (fake / "sbatch").write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\n'
                                 'echo "Submitted batch job 7"\n')
    (fake / "sbatch").chmod(0o755)
    result = cluster("--slurm", "--nodes", "2", "--gpus-per-node", "2", "--config", str(config),
                     "--name", "job", "--submit", "--", "serve",
                     path=f"{fake}:{os.environ['PATH']}")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Submitted batch job 7\n"
    script = tmp_path / "runs" / "job" / "job.sbatch"
    assert (fake / "args").read_text() == f"{script}\n"
    assert "#SBATCH --nodes=2\n" in script.read_text()


def test_writes_the_slurm_script_without_submitting(cluster, config, tmp_path):
    result = cluster("--slurm", "--nodes", "1", "--gpus-per-node", "4", "--config", str(config),
                     "--name", "job", "--", "serve")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "job"
    assert f"sbatch {run_dir / 'job.sbatch'}" in result.stdout
    assert sorted(path.name for path in run_dir.iterdir()) == [
        "command.txt", "config.yaml", "environment.sh", "job.sbatch", "ranks"]
    assert (run_dir / "command.txt").read_text().startswith("srun --mpi=pmix ")
    assert "  tp: 2\n" in (run_dir / "config.yaml").read_text()
    # A run folder that cannot be written is an error (exit 2), not a Python traceback.
    (tmp_path / "a-file").write_text("")
    result = cluster("--slurm", "--nodes", "1", "--gpus-per-node", "4", "--config", str(config),
                     "--name", "job", "--runs-dir", str(tmp_path / "a-file"), "--", "serve")
    assert result.returncode == 2, result.stderr
    assert "cannot write the run folder" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="Open MPI's root check applies to root only")
def test_root_without_open_mpi_consent_is_refused(cluster, config, tmp_path):
    result = cluster("--hosts", "localhost:4", "--config", str(config), "--", "serve")
    assert result.returncode == 2
    assert ("OMPI_ALLOW_RUN_AS_ROOT=1 and OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 are set"
            in result.stderr)
    assert not (tmp_path / "runs").exists()


def test_refuses_a_run_folder_in_use(cluster, config, tmp_path):
    used = tmp_path / "runs" / "taken"
    used.mkdir(parents=True)
    (used / "summary.txt").write_text("an earlier run\n")
    result = cluster("--hosts", "a:4", "--config", str(config), "--name", "taken", "--", "serve")
    assert result.returncode == 2
    assert f"run folder {used} already exists and is not empty" in result.stderr


def test_invalid_config_is_reported_before_anything_starts(cluster, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("topology:\n  tp: 0\n  dp: 1\n")
    result = cluster("--hosts", "a:4", "--config", str(bad), "--dry-run", "--", "serve")
    assert result.returncode == 2
    assert result.stderr.startswith(f"launch/cluster: config {bad} is not valid: ")
    assert result.stdout == ""


def test_arguments_the_launcher_owns_are_refused(cluster, config):
    result = cluster("--hosts", "a:4", "--config", str(config), "--dry-run", "--", "replay",
                     "--dp", "4")
    assert result.returncode == 2
    assert "leave --dp out of the replay arguments" in result.stderr
    result = cluster("--hosts", "a:4", "--config", str(config), "--dry-run")
    assert result.returncode == 2
    assert "name the tool after `--`: -- serve|replay" in result.stderr


def test_slot_counts_that_are_not_plain_digits_are_an_error_not_a_crash(cluster, config, tmp_path):
    # str.isdigit() accepts '²', which int() does not.
    result = cluster("--hosts", "a:\u00b2,b:2", "--config", str(config), "--dry-run", "--", "serve")
    assert result.returncode == 2, result.stderr
    assert "--hosts: slots must be a positive integer, not '\u00b2'" in result.stderr
    assert "Traceback" not in result.stderr
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=\u00b2\n")
    result = cluster("--hostfile", str(hostfile), "--config", str(config), "--dry-run", "--",
                     "serve")
    assert result.returncode == 2, result.stderr
    assert f"{hostfile}:1: slots must be a positive integer" in result.stderr


def test_a_host_name_with_whitespace_is_refused(cluster, config):
    result = cluster("--hosts", "a b:2,c:2", "--config", str(config), "--dry-run", "--", "serve")
    assert result.returncode == 2
    assert "--hosts: host name 'a b' has whitespace or a comma in it" in result.stderr


def test_hostfiles_mpirun_would_misread_are_refused_by_name(cluster, config, tmp_path):
    # A comma made `--host a,b:2` (two hosts, other slots than planned); a byte that is no UTF-8,
    # even in a comment, ended in a Python traceback.
    for name, text, says in (("comma", b"a,b slots=4\n", "has whitespace or a comma in it"),
                             ("latin1", b"# caf\xe9\na slots=2\n", "is not UTF-8 text")):
        hostfile = tmp_path / name
        hostfile.write_bytes(text)
        result = cluster("--hostfile", str(hostfile), "--config", str(config), "--dry-run", "--",
                         "serve")
        assert result.returncode == 2, result.stderr
        assert says in result.stderr and "Traceback" not in result.stderr


def test_run_folders_mpirun_or_slurm_would_misread_are_refused(cluster, config, tmp_path):
    # Open MPI 4.1 reads `--output-filename DIR:options`: the rank logs would land elsewhere.
    result = cluster("--hosts", "a:4", "--config", str(config), "--name", "a:b", "--dry-run", "--",
                     "serve")
    assert result.returncode == 2
    assert "':'" in result.stderr and "--output-filename" in result.stderr
    # A newline would end the #SBATCH lines and run the rest as a command; whitespace and '%'
    # (Slurm's filename patterns) would send the output elsewhere.
    for name in ["x\necho injected", "my run", "run%j"]:
        result = cluster("--slurm", "--nodes", "2", "--gpus-per-node", "2", "--config",
                         str(config), "--name", name, "--dry-run", "--", "serve")
        assert result.returncode == 2, (name, result.stdout)
        assert "injected" not in result.stdout
        assert "cannot carry" in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()


def test_the_run_folder_keeps_the_forwarded_values_and_slurm_keeps_its_gpu_mask(cluster, config,
                                                                                tmp_path):
    env = {"NCCL_DEBUG": "INFO", "KVF_RUNTIME_TRANSPORT": "mpi", "CUDA_VISIBLE_DEVICES": "0,1",
           "NCCL_SOCKET_IFNAME": "eth0 lo"}
    result = cluster("--slurm", "--nodes", "1", "--gpus-per-node", "4", "--config", str(config),
                     "--name", "job", "--", "serve", env=env)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "job"
    assert (run_dir / "environment.sh").read_text() == (
        "export CUDA_VISIBLE_DEVICES=0,1\nexport KVF_RUNTIME_TRANSPORT=mpi\n"
        "export NCCL_DEBUG=INFO\nexport NCCL_SOCKET_IFNAME='eth0 lo'\n")
    script = (run_dir / "job.sbatch").read_text()
    assert "export NCCL_DEBUG=INFO\n" in script
    assert "CUDA_VISIBLE_DEVICES=" not in script


def test_two_names_of_this_machine_are_refused(cluster, config, tmp_path):
    result = cluster("--hosts", f"localhost:2,{socket.gethostname()}:2", "--config", str(config),
                     "--dry-run", "--", "serve")
    assert result.returncode == 2
    assert f"hosts localhost, {socket.gethostname()} all name this machine" in result.stderr
    # Host names are case-insensitive.
    result = cluster("--hosts", "LOCALHOST:1,localhost:1", "--config", str(config), "--dry-run",
                     "--", "serve")
    assert result.returncode == 2
    assert "hosts LOCALHOST, localhost all name this machine" in result.stderr

