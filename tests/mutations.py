"""Mutation check: does the suite catch what it claims to?

Each row below is a deliberate breakage of the code. The script copies ``src/`` to a scratch
directory, applies one breakage there, runs the tests named for it against the broken copy
(``PYTHONPATH`` puts it first, for the test process and every agent it starts) and prints a
table. Every row must say ``caught``. Run by hand, not in CI (it runs the named tests once per row):

    .venv/bin/python tests/mutations.py            # every row
    .venv/bin/python tests/mutations.py -k token   # rows whose id contains "token"
    .venv/bin/python tests/mutations.py --list     # the rows, without running anything

A row whose ``old`` text no longer occurs exactly once in its file is ``stale``: the code moved,
so replace the row by the equivalent breakage of the new code. The named tests are also run once
on the unbroken code; a row whose tests fail there is ``broken`` (the tests, not the mutation,
fail).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    id: str
    what: str
    file: str  # relative to src/ (``../contrib/...`` for the scripts beside it)
    old: str  # exact text, must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids, relative to the repository


NDJSON_WALK = "tests/test_client_cli.py::test_walk_ndjson_equals_local_walk"
CSV_WALK = "tests/test_client_cli.py::test_walk_csv_to_file_equals_local_walk"
PARQUET_WALK = "tests/test_client_cli_dataset.py::test_walk_parquet_dataset_equals_local_walk"
PARTITIONS = "tests/test_client_cli_dataset.py::test_dataset_writer_cuts_partitions_and_keeps_every_row_once"
SCHEMA = "tests/test_record_schema.py::test_every_output_has_the_same_records"

RESUME = "tests/test_resume.py"
RESUME_KILL_FIRST = f"{RESUME}::test_sigkill_then_resume_lists_every_entry_once[first-partition]"
RESUME_KILL_MIDDLE = f"{RESUME}::test_sigkill_then_resume_lists_every_entry_once[middle]"
RESUME_SIGINT = f"{RESUME}::test_signal_commits_and_says_how_to_resume[SIGINT]"
RESUME_SIGTERM = f"{RESUME}::test_signal_commits_and_says_how_to_resume[SIGTERM]"
RESUME_REFUSALS = f"{RESUME}::test_resume_refusals"
RESUME_DASK = f"{RESUME}::test_dask_driver_killed_then_resumed"

CLI_ERRORS = "tests/test_client_cli_errors.py"
KILLED_MID_WALK = f"{CLI_ERRORS}::test_host_killed_mid_walk_is_named_when_set_aside_and_in_the_summary"
DASK_PROGRESS = f"{CLI_ERRORS}::test_dask_walk_shows_the_same_progress_line"

#: The start of the agent's request handler, before the token is checked.
HEALTH = """        record.endpoint = endpoint_of(parts)  # before the token check: a 401 counts as what it asked for
        if record.endpoint == "health":
            return self._health(request)
"""

MUTATIONS: list[Mutation] = [
    # -- the agent ------------------------------------------------------------------------
    Mutation(
        "agent-token-statvfs", "/_agent/v1/statvfs answered without the token", "diskover_storage_agent/server.py",
        HEALTH, HEALTH + "        if parts[:3] == (CONTROL_PREFIX, b'v1', b'statvfs'):\n"
                         "            return await self._control(request, parts[1:], params)\n",
        ("tests/test_security.py::test_agent_endpoints_need_the_token[statvfs]",)),
    Mutation(
        "agent-token-info", "/_agent/v1/info answered without the token", "diskover_storage_agent/server.py",
        HEALTH, HEALTH + "        if parts == (CONTROL_PREFIX, b'v1', b'info'):\n"
                         "            return await self._control(request, parts[1:], params)\n",
        ("tests/test_security.py::test_agent_endpoints_need_the_token[info]",)),
    Mutation(
        "agent-retry-after", "Retry-After: 30 instead of the documented 1", "diskover_storage_agent/server.py",
        'headers={"Retry-After": "1"}', 'headers={"Retry-After": "30"}',
        ("tests/test_slow_directory.py::test_agent_at_its_limit_answers_503_retry_after_1",
         "tests/test_hostile.py::test_full_wait_line_answers_503_with_retry_after")),
    Mutation(
        "agent-frontier-roots", "the walk's end frontier omits requested roots it did not reach",
        "diskover_storage_agent/subtree.py", "        yield from frontier.push(reversed(roots))\n", "",
        ("tests/test_agent_http.py::test_walk_frontier_keeps_every_requested_path[1]",
         "tests/test_agent_http.py::test_walk_frontier_keeps_every_requested_path[7]")),
    Mutation(
        "agent-exclude-dir-symlinks", "exclude_dirs not applied to symlinks to directories",
        "diskover_storage_agent/filters.py",
        "if kind == KIND_DIR or (kind == KIND_SYMLINK and target == KIND_DIR):", "if kind == KIND_DIR:",
        ("tests/test_exclusions.py::test_exclude_dirs_covers_symlinks_to_directories[exclude_dir]",
         "tests/test_exclusions.py::test_exclude_dirs_covers_symlinks_to_directories[exclude_file]")),
    Mutation(
        "agent-remote-root", "REMOTE / accepted at start-up", "diskover_storage_agent/config.py",
        "if export.remote_parts[:1] in ((), (CONTROL_PREFIX,)):", "if export.remote_parts[:1] in ((CONTROL_PREFIX,),):",
        ("tests/test_cli.py::test_reserved_remote_is_a_startup_error[root]",)),
    Mutation(
        "agent-remote-control", "REMOTE under /_agent accepted at start-up", "diskover_storage_agent/config.py",
        "if export.remote_parts[:1] in ((), (CONTROL_PREFIX,)):", "if export.remote_parts[:1] in ((),):",
        ("tests/test_cli.py::test_reserved_remote_is_a_startup_error[agent]",)),
    Mutation(
        "agent-info-features", "/_agent/v1/info answers empty features", "diskover_storage_agent/server.py",
        '"features": ["listing", "walk", "stat", "gzip"],', '"features": [],',
        ("tests/test_agent_http.py::test_info_names_features_and_exports",)),
    Mutation(
        "agent-info-exports", "/_agent/v1/info answers empty exports", "diskover_storage_agent/server.py",
        '"exports": [os.fsdecode(e.remote) for e in config.exports],', '"exports": [],',
        ("tests/test_agent_http.py::test_info_names_features_and_exports",)),
    Mutation(
        "agent-walk-413", "a walk body over 1 MiB gets 400 instead of 413", "diskover_storage_agent/server.py",
        'error_response(413, "too_large", "walk request body too large"',
        'error_response(400, "bad_request", "walk request body too large"',
        ("tests/test_hostile.py::test_walk_body_over_1MiB_is_413",)),
    Mutation(
        "agent-sigterm-grace", "--shutdown-timeout is ignored (answers in flight get the default 30 s)",
        "diskover_storage_agent/cli.py", "        shutdown_timeout=args.shutdown_timeout, ", "        ",
        ("tests/test_agent_http.py::test_sigterm_cuts_answers_in_flight_after_the_shutdown_timeout",)),
    Mutation(
        "agent-sigterm-cut", "answers stalled after SIGTERM are not cut (aiohttp then waits the grace again)",
        "diskover_storage_agent/server.py", "                conn.transport.abort()", "                pass",
        ("tests/test_agent_http.py::test_sigterm_cuts_answers_in_flight_after_the_shutdown_timeout",)),
    Mutation(
        "agent-uvloop", "the agent runs on asyncio's loop with uvloop installed", "diskover_storage_agent/cli.py",
        "runner = uvloop.run", "runner = asyncio.run",
        ("tests/test_cli.py::test_event_loop_is_uvloop_when_installed[True]",)),

    # -- processes -----------------------------------------------------------------------
    Mutation(
        "processes-never-forked", "--processes N serves with one process", "diskover_storage_agent/config.py",
        "return min(self.processes, self.maxconnections)", "return 1",
        ("tests/test_processes.py::test_each_process_serves_and_scrapes_sum_them_all",)),
    Mutation(
        "processes-more-than-c", "more worker processes than -c", "diskover_storage_agent/config.py",
        "return min(self.processes, self.maxconnections)", "return self.processes",
        ("tests/test_processes.py::test_c_1_means_one_process",)),
    Mutation(
        "processes-c-not-split", "every worker process gets the whole -c", "diskover_storage_agent/config.py",
        "mine = self.maxconnections // n + (index < self.maxconnections % n)", "mine = self.maxconnections",
        ("tests/test_processes.py::test_each_process_serves_and_scrapes_sum_them_all",
         "tests/test_processes.py::test_503_at_a_process_limit")),
    Mutation(
        "processes-zero-accepted", "--processes 0 accepted", "diskover_storage_agent/config.py",
        "if self.processes < 1:", "if self.processes < 0:",
        ("tests/test_processes.py::test_processes_must_be_at_least_1[0]",)),
    Mutation(
        "processes-metrics-not-summed", "a scrape answers the metrics of the process scraped only",
        "diskover_storage_agent/observability.py", "return generate_latest(self.scraped)",
        "return generate_latest(self.registry)",
        ("tests/test_processes.py::test_each_process_serves_and_scrapes_sum_them_all",)),
    Mutation(
        "processes-dead-gauges-kept", "the gauges of a dead worker still count", "diskover_storage_agent/workers.py",
        "            _forget(pid)\n", "",
        ("tests/test_processes.py::test_gauges_are_summed_over_live_processes",)),
    Mutation(
        "processes-not-replaced", "a worker that dies is not replaced", "diskover_storage_agent/workers.py",
        "            if not self.stopping:\n                self._spawn(index)",
        "            if not self.stopping:\n                pass",
        ("tests/test_processes.py::test_a_killed_process_is_replaced_and_its_counts_kept",)),
    Mutation(
        "processes-sigterm-kept", "SIGTERM is not passed on to the workers", "diskover_storage_agent/workers.py",
        "                os.kill(pid, signal.SIGTERM)", "                pass",
        ("tests/test_processes.py::test_sigterm_stops_every_process_and_exits_0",)),
    Mutation(
        "processes-exit-status", "the parent exits 1 after a graceful stop", "diskover_storage_agent/workers.py",
        '        log.info("stopped")\n        return 0', '        log.info("stopped")\n        return 1',
        ("tests/test_processes.py::test_sigterm_stops_every_process_and_exits_0",)),
    Mutation(
        "processes-orphans-live", "workers outlive a parent killed with SIGKILL", "diskover_storage_agent/workers.py",
        "signalled = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0", "signalled = True",
        ("tests/test_processes.py::test_children_die_with_the_parent",)),

    Mutation(
        "processes-reuseport-unset", "reuseport not set: the workers share the parent's one listening socket",
        "diskover_storage_agent/workers.py",
        'return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")', "return False",
        ("tests/test_processes.py::test_each_process_listens_on_a_socket_of_its_own",)),
    Mutation(
        "processes-parent-listens", "the parent's socket that holds the port listens too: its share of new "
        "connections is never accepted", "diskover_storage_agent/workers.py",
        "                sockets.append(_socket(family, addr, reuseport=True))\n",
        "                sockets.append(_socket(family, addr, reuseport=True))\n"
        "                sockets[-1].listen(8)\n",
        ("tests/test_processes.py::test_each_process_listens_on_a_socket_of_its_own",
         "tests/test_processes.py::test_new_connections_are_spread_over_the_processes")),
    Mutation(
        "processes-port-not-kept", "each worker binds a port of its own, not the parent's",
        "diskover_storage_agent/workers.py",
        "sockets.append(_socket(sock.family, sock.getsockname(), reuseport=True))",
        "sockets.append(_socket(sock.family, (sock.getsockname()[0], 0), reuseport=True))",
        ("tests/test_processes.py::test_each_process_serves_and_scrapes_sum_them_all",
         "tests/test_processes.py::test_new_connections_are_spread_over_the_processes")),
    Mutation(
        "processes-port-shared", "a port another agent serves is shared with it (SO_REUSEPORT), not an error",
        "diskover_storage_agent/workers.py",
        "_socket(family, addr, reuseport=False).close()", "_socket(family, addr, reuseport=True).close()",
        ("tests/test_processes.py::test_a_port_another_agent_serves_is_an_error",)),

    Mutation(
        "processes-announced-early", "the parent says it listens before its workers do",
        "diskover_storage_agent/workers.py", "            os.read(fd, 1)\n", "",
        ("tests/test_processes.py::test_each_process_listens_on_a_socket_of_its_own",)),

    # -- the client and the scanner ---------------------------------------------------------
    Mutation("scanner-gid-as-uid", "the scanner's stat() gives gid as st_uid", "diskover_agent/scanner/records.py",
             "st_gid = property(lambda self: self._f[5])", "st_gid = property(lambda self: self._f[4])",
             ("tests/test_diskover_scanner.py::test_check_dirpath_abspath_stat_and_scandir",
              "tests/test_diskover_scanner.py::test_diskover_crawl_through_the_shim_equals_the_local_crawl[one-agent]")),
    Mutation("scanner-mtime-ns-as-atime", "the scanner's stat() gives st_mtime_ns as st_atime_ns",
             "diskover_agent/scanner/records.py",
             "st_mtime_ns = property(lambda self: self._f[8])", "st_mtime_ns = property(lambda self: self._f[7])",
             ("tests/test_diskover_scanner.py::test_check_dirpath_abspath_stat_and_scandir",
              "tests/test_diskover_scanner.py::test_diskover_crawl_through_the_shim_equals_the_local_crawl[one-agent]")),
    Mutation("scanner-mtime-as-atime", "the scanner's stat() gives st_mtime as st_atime",
             "diskover_agent/scanner/records.py",
             "st_mtime = property(lambda self: _seconds(self._f[8]))",
             "st_mtime = property(lambda self: _seconds(self._f[7]))",
             ("tests/test_diskover_scanner.py::test_check_dirpath_abspath_stat_and_scandir",
              "tests/test_diskover_scanner.py::test_diskover_crawl_through_the_shim_equals_the_local_crawl[one-agent]")),
    Mutation("scanner-atime-as-mtime", "the scanner's stat() gives st_atime_ns as st_mtime_ns",
             "diskover_agent/scanner/records.py",
             "st_atime_ns = property(lambda self: self._f[7])", "st_atime_ns = property(lambda self: self._f[8])",
             ("tests/test_diskover_scanner.py::test_check_dirpath_abspath_stat_and_scandir",
              "tests/test_diskover_scanner.py::test_diskover_crawl_through_the_shim_equals_the_local_crawl[one-agent]")),
    Mutation("entry-mtime-as-atime", "AgentDirEntry.stat() gives st_mtime as the atime", "diskover_agent/entry.py",
             "m_s, m_ns = divmod(mtime, 1_000_000_000)", "m_s, m_ns = divmod(atime, 1_000_000_000)",
             ("tests/test_walk.py::test_walk_entries_carry_exact_lstat",
              "tests/test_walk.py::test_scandir_entries_carry_exact_lstat")),
    Mutation("entry-mtime-ns-as-atime", "AgentDirEntry.stat() gives st_mtime_ns as the atime",
             "diskover_agent/entry.py",
             "atime, mtime, ctime, blksize, blocks, rdev,", "atime, atime, ctime, blksize, blocks, rdev,",
             ("tests/test_walk.py::test_walk_entries_carry_exact_lstat",
              "tests/test_walk.py::test_scandir_entries_carry_exact_lstat")),
    Mutation("entry-uid-gid-swapped", "AgentDirEntry.stat() swaps uid and gid", "diskover_agent/entry.py",
             "mode, ino, dev, nlink, uid, gid, size, a_s, m_s, c_s,",
             "mode, ino, dev, nlink, gid, uid, size, a_s, m_s, c_s,",
             ("tests/test_walk.py::test_walk_entries_carry_exact_lstat",
              "tests/test_walk.py::test_scandir_entries_carry_exact_lstat")),
    Mutation("client-no-gzip", "the client never asks for gzip", "diskover_agent/transport.py",
             '"Accept-Encoding": "gzip" if self.compress else "identity"', '"Accept-Encoding": "identity"',
             ("tests/test_client_wire.py::test_compress_asks_for_gzip_and_gets_it_on_the_wire",)),
    Mutation("client-gzip-on-loopback", "the client asks for gzip on loopback too", "diskover_agent/transport.py",
             "self.compress = (not is_loopback(address.host)) if options.compress is None else options.compress",
             "self.compress = True if options.compress is None else options.compress",
             ("tests/test_client_wire.py::test_no_gzip_on_loopback_by_default",)),
    Mutation("connect-stops-at-dead-host", "connect() stops at the first dead host instead of skipping it",
             "diskover_agent/connection.py",
             'errors.append(f"{address.label}: {exc}")\n                continue',
             'errors.append(f"{address.label}: {exc}")\n                break',
             ("tests/test_client_wire.py::test_connect_skips_a_dead_host",)),
    Mutation("client-503-fatal", "the client takes the agent's 503 for a refusal, not for busy",
             "diskover_agent/transport.py", "if resp.status == 503:", "if resp.status == 999:",
             ("tests/test_client_wire.py::test_walk_through_the_agents_own_503_is_exact",)),
    Mutation("backoff-not-doubling", "a failing host is set aside 0.2 s every time (no doubling)",
             "diskover_agent/backoff.py",
             "backoff = min(BACKOFF_FIRST * 2 ** (self.failures[idx] - 1), BACKOFF_MAX)", "backoff = BACKOFF_FIRST",
             ("tests/test_client_wire.py::test_backoff_doubles_from_0_2_to_5_seconds_and_resets",
              "tests/test_client_wire.py::test_a_failing_host_is_retried_with_growing_intervals")),
    Mutation("backoff-not-wired", "a failure sets the host aside for no time at all",
             "diskover_agent/backoff.py",
             "delay = retry_after if retry_after is not None else backoff",
             "delay = retry_after if retry_after is not None else 0.0",
             ("tests/test_client_wire.py::test_a_failing_host_is_retried_with_growing_intervals",)),
    Mutation("budget-first-not-small", "the first subtree request gets the whole budget", "diskover_agent/walk.py",
             "self._budget = min(FIRST_BUDGET, max_budget)", "self._budget = max_budget",
             ("tests/test_client_wire.py::test_first_budget_small_doubling_to_4096",)),
    Mutation("budget-not-doubling", "the subtree budget never grows", "diskover_agent/walk.py",
             "self._budget = min(self._budget * 2, self.max_budget)", "self._budget = self._budget",
             ("tests/test_client_wire.py::test_first_budget_small_doubling_to_4096",)),
    Mutation("budget-uncapped", "the subtree budget doubles past 4,096", "diskover_agent/walk.py",
             "self._budget = min(self._budget * 2, self.max_budget)", "self._budget = self._budget * 2",
             ("tests/test_client_wire.py::test_first_budget_small_doubling_to_4096",)),
    Mutation("subtree-per-host-uncapped", "no cap on subtree requests in flight per agent", "diskover_agent/walk.py",
             'idx, wait = self.hosts.pick(None if self.mode == "listdir" else SUBTREE_PER_HOST)',
             "idx, wait = self.hosts.pick(None)",
             ("tests/test_client_wire.py::test_at_most_4_subtree_requests_per_agent",
              "tests/test_client_wire.py::test_at_most_4_subtree_requests_per_agent_beside_a_dead_one")),

    Mutation("names-slash-kept", "a names frame with '/' in a name is accepted", "diskover_agent/protocol.py",
             'if b"/" in blob:', 'if False:',
             ("tests/test_names_frames.py::test_decode_names_refuses[frame0-None-invalid entry name-b/c']",
              "tests/test_names_frames.py::test_lying_names_frames_are_refused[slash]")),
    Mutation("names-empty-kept", "an empty name (or '.', '..') in a names frame is accepted",
             "diskover_agent/protocol.py",
             "not new.isdisjoint(_NOT_TEXT_NAMES if text else _NOT_NAMES)", "False",
             ("tests/test_names_frames.py::test_lying_names_frames_are_refused[empty-name]",
              "tests/test_names_frames.py::test_lying_names_frames_are_refused[dotdot]")),
    Mutation("names-duplicate-kept", "a name twice in one names frame is accepted", "diskover_agent/protocol.py",
             "if len(new) != len(names) or", "if",
             ("tests/test_names_frames.py::test_lying_names_frames_are_refused[duplicate]",)),
    Mutation("names-duplicate-across-frames", "a name repeated in a later names frame of its directory is accepted",
             "diskover_agent/protocol.py",
             "seen is not None and not seen.isdisjoint(new)", "False",
             ("tests/test_names_frames.py::test_lying_names_frames_are_refused[duplicate-across-frames]",)),
    Mutation("names-kinds-length", "a names frame with fewer or more kinds than names is accepted",
             "diskover_agent/protocol.py",
             "if len(names) != len(kinds):", "if False:",
             ("tests/test_names_frames.py::test_lying_names_frames_are_refused[kinds-short]",
              "tests/test_names_frames.py::test_lying_names_frames_are_refused[kinds-long]")),
    Mutation("names-kind-letters", "a names frame's kind letters are not checked", "diskover_agent/protocol.py",
             "if kinds.strip(KIND_LETTERS):", "if False:",
             ("tests/test_names_frames.py::test_lying_names_frames_are_refused[bad-kind-inside]",)),
    Mutation("names-targets", "a names frame's targets are not checked against its symlinks",
             "diskover_agent/protocol.py",
             "if len(targets) != kinds.count(KIND_SYMLINK) or targets.strip(TARGET_LETTERS):", "if False:",
             ("tests/test_names_frames.py::test_lying_names_frames_are_refused[targets-long]",
              "tests/test_names_frames.py::test_lying_names_frames_are_refused[bad-target]")),
    Mutation("names-decoded-as-latin1", "names frames decoded as Latin-1, not as os.fsdecode does",
             "diskover_agent/protocol.py",
             'blob.decode(FS_ENCODING, FS_ERRORS).split("\\0") if text', 'blob.decode("latin-1").split("\\0") if text',
             ("tests/test_names_frames.py::test_names_walk_reads_names_frames_exactly[str]",
              "tests/test_names_frames.py::test_decode_names_as_text_and_bytes")),
    Mutation("names-subdirs-not-walked", "subdirectories listed in names frames are not walked",
             "diskover_agent/walk.py", "if KIND_DIR in kinds:", "if False:",
             ("tests/test_names_frames.py::test_names_walk_reads_names_frames_exactly[str]",)),
    Mutation("names-links-as-files", "symlinks to directories from names frames go to files",
             "diskover_agent/oswalk.py", "elif kind == KIND_SYMLINK and next(link_targets) == KIND_DIR:",
             "elif kind == KIND_SYMLINK and next(link_targets) == 'never':",
             ("tests/test_names_frames.py::test_names_walk_reads_names_frames_exactly[str]",)),
    Mutation("names-fallback-all-at-once", "an agent refusing names_frames is asked without every newer field",
             "diskover_agent/walk.py",
             "out.level = NAMES_REFUSED if req.names_frames else LEGACY", "out.level = LEGACY",
             ("tests/test_names_frames.py::test_agent_refusing_only_names_frames_keeps_the_other_fields",)),
    Mutation("names-never-asked", "names walks never ask for names frames", "diskover_agent/walk.py",
             "names_frames=level < NAMES_REFUSED and not self.stat,", "names_frames=False,",
             ("tests/test_names_frames.py::test_names_walk_reads_names_frames_exactly[str]",)),
    Mutation("walk-all-threads", "a subtree walk starts every worker thread", "diskover_agent/walk.py",
             "self._start(self._lanes)", "self._start(self.workers)",
             ("tests/test_names_frames.py::test_subtree_walk_runs_only_the_threads_it_can_use",)),
    Mutation("walk-threads-not-grown", "a host without the subtree walk is served by the first threads only",
             "diskover_agent/walk.py",
             "self._start(self.workers)  # one directory per request", "pass  # one directory per request",
             ("tests/test_names_frames.py::test_walk_through_an_agent_without_subtree_runs_its_workers",)),
    Mutation("walk-connection-not-reused", "a walk answer read to its end frame closes the connection",
             "diskover_agent/transport.py",
             "if ended and not resp.read(1):", "if False:",
             ("tests/test_client_wire.py::test_walk_requests_reuse_their_connections",)),

    # -- more ----------------------------------------------------------------------------
    Mutation(
        "walk-pruned-work-kept", "queued work below a directory pruned in the loop body is still listed",
        "diskover_agent/walk.py", "dropped = [p for p in batch if self._is_pruned(p)]", "dropped = []",
        ("tests/test_exclusions.py::test_pruning_in_the_loop_body",),
    ),
    Mutation(
        "walk-backpressure-bypassed", "a worker woken by new work skips the backpressure check",
        "diskover_agent/walk.py", "                elif self._todo:\n                    break",
        "                if self._todo:\n                    break",
        ("tests/test_exclusions.py::test_pruning_in_the_loop_body",),
    ),

    # -- out: the walk's output (walk -o FILE records, the dataset) -----------------------------
    Mutation("out-path-not-utf8-latin1", "a record's path that is not UTF-8 decoded as Latin-1, not with U+FFFD",
             "diskover_agent/schema.py",
             'return raw.decode("utf-8", "replace"), raw', 'return raw.decode("latin-1"), raw',
             (NDJSON_WALK, PARQUET_WALK)),
    Mutation("out-dataset-uid-gid-swapped", "the dataset's uid column holds the gid and the reverse",
             "diskover_agent/schema.py",
             "pa.array([e.stat for e in entries], type=record)",
             "pa.array([(st := e.stat) and (*st[:4], st[5], st[4], *st[6:]) for e in entries], type=record)",
             (PARQUET_WALK, "tests/test_distributed.py::test_dataset_is_exactly_the_tree")),
    Mutation("out-dataset-utf8-names-raw", "every output gives name_raw for names that are UTF-8 too",
             "diskover_agent/schema.py",
             "return decoded, [None] * len(names)", "return decoded, list(names)",
             (NDJSON_WALK, PARQUET_WALK)),
    Mutation("out-dataset-bytes-not-files-only", "the dataset's summary counts symlinks' sizes as bytes in files",
             "diskover_agent/schema.py",
             "if e.kind == KIND_FILE and (st := e.stat) is not None", "if (st := e.stat) is not None",
             (PARQUET_WALK,)),
    Mutation("out-dataset-rows-written-twice", "a partition's rows are written again in the next partition",
             "diskover_agent/dataset.py",
             "            s.errors += rows.errors\n            self._rows = Rows()",
             "            s.errors += rows.errors",
             (PARTITIONS,)),
    Mutation("out-dataset-last-partition-lost", "the last partition of a walk written by one process is not written",
             "diskover_agent/dataset.py",
             "        self.commit(empty=not self.summary.files)\n", "        self._save()\n",
             (PARTITIONS,)),
    Mutation("out-dataset-no-error-rows", "walk --format parquet writes no row for a directory it could not list",
             "diskover_agent/cli/crawl.py",
             "                    if self.on_error is not None:\n                        self.on_error(d.path, err)",
             "                    pass",
             ("tests/test_client_cli_dataset.py::test_walk_parquet_unreadable_directories_are_error_rows",)),
    # -- schema: one record schema for every output (diskover_agent.schema) ---------------------
    Mutation("schema-csv-raw-dropped", "the CSV writer leaves the exact bytes (the *_raw columns) out",
             "diskover_agent/schema.py",
             'out[i] = base64.b64encode(out[i]).decode("ascii")', "out[i] = None",
             (CSV_WALK, SCHEMA)),
    Mutation("schema-dataset-column-renamed", "the dataset's Parquet partitions name the ino column inode",
             "diskover_agent/schema.py",
             "    return table\n",
             '    return table.rename_columns([c.replace("ino", "inode") for c in table.column_names])\n',
             (PARQUET_WALK, SCHEMA)),
    Mutation("schema-ndjson-column-renamed", "NDJSON records (walk -o FILE, NDJSON partitions) name ino inode",
             "diskover_agent/schema.py",
             "class Row(msgspec.Struct, gc=False):", 'class Row(msgspec.Struct, gc=False, rename={"ino": "inode"}):',
             (NDJSON_WALK, SCHEMA)),
    Mutation("schema-parquet-parent-raw-lost", "the Parquet partitions leave parent_raw null for parents not UTF-8",
             "diskover_agent/schema.py",
             "parent_raw += [praw] * len(es)", "parent_raw += [None] * len(es)",
             (PARQUET_WALK, SCHEMA)),
    Mutation("schema-records-parent-raw-lost", "NDJSON and CSV records leave parent_raw null for parents not UTF-8",
             "diskover_agent/schema.py",
             "    ptext, praw = text(parent)\n    names, raws",
             "    ptext, praw = text(parent)[0], None\n    names, raws",
             (NDJSON_WALK, CSV_WALK, SCHEMA)),
    Mutation("schema-error-message-repr", "an error record's message is the exception's text, not strerror",
             "diskover_agent/schema.py",
             "error_message=error.strerror or str(error)", "error_message=str(error)",
             (SCHEMA, "tests/test_client_cli.py::test_walk_unreadable_directories_exit_1")),
    Mutation("schema-file-no-error-rows", "walk -o FILE writes no record for a directory it could not list",
             "diskover_agent/cli/output.py",
             "        self.write([schema.error_row(path, error)])", "        pass",
             (SCHEMA, "tests/test_client_cli.py::test_walk_unreadable_directories_exit_1")),
    Mutation("schema-report-csv-names-null", "report reads a CSV's empty names (error records) as null",
             "diskover_agent/report.py",
             "coalesce(name, '') AS name", "name AS name",
             (SCHEMA,)),
    Mutation("schema-report-csv-as-json", "report reads a CSV output as NDJSON",
             "diskover_agent/report.py",
             "if first == CSV_HEADER + b\"\\n\":", "if False:",
             (SCHEMA, "tests/test_client_cli_dataset.py::test_report_reads_walk_files_and_refuses_other_files")),
    # -- fast: the agent's read loop (the compiled one is rebuilt for rows that break it) ------
    Mutation(
        "fast-names-kind", "the compiled names loop calls a fifo a file", "diskover_storage_agent/_readdir.c",
        "case DT_FIFO: return 'p';", "case DT_FIFO: return 'f';",
        ("tests/test_read_loop.py::test_both_read_loops_answer_the_same_bytes[names-msgpack]",
         "tests/test_read_loop.py::test_names_frames_and_entries_frames_tell_the_same[compiled]")),
    Mutation(
        "fast-symlink-target", "the compiled names loop gives a dangling symlink's target as a file",
        "diskover_storage_agent/_readdir.c",
        "fstatat(self->fd, name, &st, 0) == 0 ? kind_of_mode(st.st_mode) : '-';",
        "fstatat(self->fd, name, &st, 0) == 0 ? kind_of_mode(st.st_mode) : 'f';",
        ("tests/test_read_loop.py::test_both_read_loops_answer_the_same_bytes[names-msgpack]",
         "tests/test_read_loop.py::test_names_frames_and_entries_frames_tell_the_same[compiled]")),
    Mutation(
        "fast-name-bytes", "the compiled names loop cuts a name at its first newline",
        "diskover_storage_agent/_readdir.c",
        "        memcpy(self->out.data + self->out.len, name, len);\n        self->out.len += len;",
        "        len = strcspn(name, \"\\n\");\n        memcpy(self->out.data + self->out.len, name, len);\n"
        "        self->out.len += len;",
        ("tests/test_read_loop.py::test_both_read_loops_answer_the_same_bytes[names-msgpack]",
         "tests/test_read_loop.py::test_names_frames_and_entries_frames_tell_the_same[compiled]")),
    Mutation(
        "fast-name-bytes-stat", "the compiled stat loop writes a name's bytes from one byte on",
        "diskover_storage_agent/_readdir.c",
        "        memcpy(b->data + b->len, name, len);\n        b->len += len;\n"
        "        b->data[b->len++] = (char)0xa1;\n"
        "        b->data[b->len++] = kind;\n        b->data[b->len++] = (char)0xc0;  /* target: nil",
        "        memcpy(b->data + b->len, name + (len > 1), len);\n        b->len += len;\n"
        "        b->data[b->len++] = (char)0xa1;\n"
        "        b->data[b->len++] = kind;\n        b->data[b->len++] = (char)0xc0;  /* target: nil",
        ("tests/test_read_loop.py::test_both_read_loops_answer_the_same_bytes[stat-msgpack]",
         "tests/test_walk.py::test_walk_entries_carry_exact_lstat[compiled]")),
    Mutation(
        "fast-subdirs-names", "the compiled names loop reports no subdirectory (nothing below the top is walked)",
        "diskover_storage_agent/_readdir.c",
        "if (kind == 'd' && spans_add(&self->subdirs, self->out.len, len) < 0) {",
        "if (kind == 'D' && spans_add(&self->subdirs, self->out.len, len) < 0) {",
        ("tests/test_read_loop.py::test_both_read_loops_answer_the_same_bytes[names-msgpack]",
         "tests/test_read_loop.py::test_names_frames_and_entries_frames_tell_the_same[compiled]")),
    Mutation(
        "fast-subdirs-stat", "the compiled stat loop reports no subdirectory (nothing below the top is walked)",
        "diskover_storage_agent/_readdir.c",
        "target_stat] */\n        put_bin_header(b, len);\n        if (kind == 'd' && spans_add(",
        "target_stat] */\n        put_bin_header(b, len);\n        if (kind == 'D' && spans_add(",
        ("tests/test_read_loop.py::test_both_read_loops_answer_the_same_bytes[stat-msgpack]",
         "tests/test_walk.py::test_walk_entries_carry_exact_lstat[compiled]")),
    Mutation(
        "fast-items-target", "the compiled loop of entries without stat gives no symlink's target",
        "diskover_storage_agent/_readdir.c", "        if (target == '-') {  /* not a symlink",
        "        if (target != 0) {  /* not a symlink",
        ("tests/test_read_loop.py::test_both_read_loops_answer_the_same_bytes[entries-msgpack]",
         "tests/test_read_loop.py::test_names_frames_and_entries_frames_tell_the_same[compiled]")),
    Mutation(
        "fast-dtype-unknown", "the compiled names loop calls every entry without d_type a file",
        "diskover_storage_agent/_readdir.c",
        "kind = fstatat(self->fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 ? kind_of_mode(st.st_mode) : 'f';",
        "kind = 'f';",
        ("tests/test_read_loop.py::test_both_read_loops_agree_without_d_type",)),
    Mutation(
        "fast-handback-dropped", "symlinks the compiled stat loop hands back are left out of the frame",
        "diskover_storage_agent/readloop.py", "                parts.append(encode_entry_item(entry))\n", "",
        ("tests/test_read_loop.py::test_both_read_loops_answer_the_same_bytes[stat-msgpack]",
         "tests/test_walk.py::test_walk_entries_carry_exact_lstat[compiled]")),
    # -- clia: the command line as people type it ----------------------------------------------
    Mutation("clia-global-after-ignored", "walk has no global options after the subcommand",
             "diskover_agent/cli/main.py", "    _add_globals(walk, suppress=True)\n", "",
             ("tests/test_client_cli_habits.py::test_global_options_after_the_subcommand",)),
    Mutation("clia-subcommand-resets-global", "a subcommand's copy of a global option resets the value given before it",
             "diskover_agent/cli/main.py", "d = argparse.SUPPRESS if suppress else None", "d = None",
             ("tests/test_client_cli_habits.py::test_global_options_after_the_subcommand",)),
    Mutation("clia-no-suggestion", "a mistyped option gets no suggestion", "diskover_agent/cli/main.py",
             'return f" (did you mean {close[0]}?)"', 'return ""',
             ("tests/test_client_cli_habits.py::test_mistyped_options_and_commands_get_a_suggestion",)),
    Mutation("clia-maxdepth-alias-ambiguous", "--max is ambiguous between --max-depth and its hidden alias",
             "diskover_agent/cli/main.py",
             "        return list({t[0].dest: t for t in reversed(found)}.values())[::-1]", "        return found",
             ("tests/test_client_cli_habits.py::test_max_depth_spelt_alike_in_walk_and_du",)),
    Mutation("clia-ls-paths-after-option-lost", "ls /a -l /b lists only /a", "diskover_agent/cli/main.py",
             'ns.paths += [a for a in extras if not a.startswith("-")]', "pass",
             ("tests/test_client_cli_habits.py::test_ls_several_paths_as_ls",)),
    Mutation("clia-agent-no-V", "diskover-storage-agent has no -V", "diskover_storage_agent/cli.py",
             'p.add_argument("-V", "--version", action="version"', 'p.add_argument("--version", action="version"',
             ("tests/test_client_cli_habits.py::test_version_option",)),
    Mutation("clia-env-ignored", "the CLI reads none of the scanner's settings", "diskover_agent/cli/main.py",
             "values, _path = configured(env)", 'values, _path = {}, ""',
             ("tests/test_client_cli_habits.py::test_env_port_hosts_and_option_wins",
              "tests/test_client_cli_habits.py::test_env_config_file")),
    Mutation("clia-env-token-file-wins", "DISKOVER_AGENT_TOKEN_FILE wins over DISKOVER_AGENT_TOKEN",
             "diskover_agent/cli/main.py", '        values.pop("token-file", None)\n', "",
             ("tests/test_client_cli_habits.py::test_env_token_file_and_tls",)),
    Mutation("clia-env-exclusions-dropped", "DISKOVER_AGENT_EXCLUDE_DIRS is ignored by the CLI",
             "diskover_agent/cli/main.py", 'args.exclude_dirs = [*args.exclude, *values.get("exclude-dirs", ())]',
             "args.exclude_dirs = list(args.exclude)",
             ("tests/test_client_cli_habits.py::test_env_exclusions_add_to_the_options",)),
    Mutation("clia-ls-exports-not-named", "ls outside every export does not name the exports",
             "diskover_agent/cli/ls.py", "if not exports or any(", "if True or any(",
             ("tests/test_client_cli_habits.py::test_ls_outside_every_export_names_the_exports",)),
    Mutation("clia-ls-stops-at-failing-path", "ls stops at the first path that fails", "diskover_agent/cli/ls.py",
             "                status = EXIT_PARTIAL\n                continue\n",
             "                return EXIT_PARTIAL\n",
             ("tests/test_client_cli_habits.py::test_ls_several_paths_as_ls",)),
    Mutation("clia-du-s-total-twice", "du -s prints a total line too", "diskover_agent/cli/du.py",
             "    if args.total:", "    if args.total or args.summarize:",
             ("tests/test_client_cli.py::test_du_counts_max_depth_summarize_total_and_cross_directory_hard_link",
              "tests/test_client_cli_habits.py::test_du_several_paths_like_gnu_du")),
    Mutation("clia-du-zero-line", "du prints a zero line for a path that fails", "diskover_agent/cli/du.py",
             "    if failed or top_stat is None:\n        return None, crawl\n", "",
             ("tests/test_client_cli_habits.py::test_du_several_paths_like_gnu_du",)),
    Mutation("clia-du-bytes-default", "du prints bytes, not 1024-byte blocks, by default", "diskover_agent/cli/du.py",
             "    return lambda n: str(-(-n // 1024))", "    return str",
             ("tests/test_client_cli.py::test_du_prints_as_gnu_du",)),
    Mutation("clia-du-parent-first", "du prints a directory before what is below it", "diskover_agent/cli/du.py",
             "                stack.append((path, depth, 1, totals))\n", "                yield path, totals\n",
             ("tests/test_client_cli.py::test_du_prints_as_gnu_du",)),
    # -- clib: the command line's one-line errors, hosts set aside, the progress line, metrics labels, example config
    Mutation(
        "clib-cafile", "a --cafile without a certificate is not checked before connecting",
        "diskover_agent/cli/common.py",
        "        if args.cafile is not None:\n            _check_cafile(args.cafile)\n", "",
        (f"{CLI_ERRORS}::test_cafile_without_a_certificate[empty]",)),
    Mutation(
        "clib-hosts-spaces", "hosts separated by spaces are taken as one host name",
        "diskover_agent/transport.py", "    if any(c.isspace() for c in text):\n", "    if False:\n",
        (f"{CLI_ERRORS}::test_hosts_are_separated_by_commas_not_spaces",)),
    Mutation(
        "clib-token-binary", "a binary token file is reported as a token of the wrong characters",
        "diskover_wire/tokens.py", "    if not all(32 <= b < 127 or b in b\"\\t\\n\\r\" for b in data):",
        "    if False:", (f"{CLI_ERRORS}::test_token_file_that_is_not_one_token[binary]",)),
    Mutation(
        "clib-output-traceback", "output that cannot be written ends in a traceback",
        "diskover_agent/cli/main.py", "    except OSError as exc:  # what the commands write",
        "    except ValueError as exc:  # what the commands write",
        (f"{CLI_ERRORS}::test_output_that_cannot_be_written_exits_2",)),
    Mutation(
        "clib-output-name", "walk -o FILE that cannot be written is not named",
        "diskover_agent/cli/walk.py", "    except OSError as exc:  # the output could not be written",
        "    except ValueError as exc:  # the output could not be written",
        (f"{CLI_ERRORS}::test_output_that_cannot_be_written_exits_2",)),
    Mutation(
        "clib-report-flush", "report's output is flushed at exit, past the error handling",
        "diskover_agent/cli/report.py",
        "    sys.stdout.flush()  # a write error surfaces here, as the command's, not at exit\n", "",
        (f"{CLI_ERRORS}::test_output_file_that_cannot_grow_exits_2[buffered]",)),
    Mutation(
        "clib-unbuffered-partial", "unbuffered (PYTHONUNBUFFERED), output cut short by a full disk is lost silently",
        "diskover_agent/cli/common.py", "    if isinstance(raw, io.RawIOBase):", "    if False:",
        (f"{CLI_ERRORS}::test_output_file_that_cannot_grow_exits_2[PYTHONUNBUFFERED]",)),
    Mutation(
        "clib-extra", "a missing extra is found out only when its module is imported",
        "diskover_agent/cli/common.py", "            found = importlib.util.find_spec(name) is not None",
        "            found = True", (f"{CLI_ERRORS}::test_missing_dask_extra_names_the_pip_install",)),
    Mutation(
        "clib-tls-advice", "TLS on one side only is reported as an unreachable agent, without the advice",
        "diskover_agent/cli/main.py",
        "        mismatch = ctx.tls_mismatch() if ctx is not None and isinstance(exc, AgentConnectionError) else None",
        "        mismatch = None", (f"{CLI_ERRORS}::test_tls_on_one_side_only_says_add_or_remove_tls",)),
    Mutation(
        "clib-insecure", "--insecure without --tls is accepted (and does nothing)",
        "diskover_agent/cli/common.py", "        if args.insecure and not tls:", "        if False:",
        (f"{CLI_ERRORS}::test_insecure_without_tls",)),
    Mutation(
        "clib-set-aside-said", "a host set aside for not answering is not named on stderr",
        "diskover_agent/walk.py", "        if reason is not None and self.watcher is not None:", "        if False:",
        (KILLED_MID_WALK,)),
    Mutation(
        "clib-set-aside-summary", "the summary does not name the hosts set aside",
        "diskover_agent/cli/crawl.py",
        "    aside = f\", set aside (not answering): {', '.join(down)}\" if down else \"\"",
        "    aside = \"\"", (KILLED_MID_WALK,)),
    Mutation(
        "clib-stop-sets-aside", "stopping a walk sets its hosts aside (a closed output pipe prints about them)",
        "diskover_agent/walk.py",
        "            if self._stopping:  # broken off by stop(): the host did nothing wrong\n                return\n",
        "",
        (f"{CLI_ERRORS}::test_progress_leaves_nothing_behind_when_the_output_is_closed_early",)),
    Mutation(
        "clib-progress-left", "the progress line stays on the terminal",
        "diskover_agent/cli/crawl.py", "leave=False", "leave=True",
        (f"{CLI_ERRORS}::test_progress_leaves_nothing_behind_when_the_output_is_closed_early",)),
    Mutation(
        "clib-dask-progress", "walk --dask shows no progress line",
        "diskover_agent/cli/walk.py", "display = Progress(ctx, counts) if _show_progress(ctx) else None",
        "display = None", (DASK_PROGRESS,)),
    Mutation(
        "clib-dask-hosts", "walk --dask's progress line counts no host in use",
        "diskover_agent/cli/walk.py", "                self._requests[host] += n\n", "                pass\n",
        (DASK_PROGRESS,)),
    Mutation(
        "clib-stale-keepalive", "a request on a kept-alive connection the agent closed fails (the host set aside)",
        "diskover_agent/transport.py", "            if not reused:\n                raise\n", "            raise\n",
        ("tests/test_client_wire.py::test_a_kept_alive_connection_the_agent_closed_is_sent_again",)),
    Mutation(
        "clib-metrics-401", "a refused request is counted as a listing, whatever it asked for",
        "diskover_storage_agent/server.py", "        if denied is not None:\n            return denied\n",
        "        if denied is not None:\n            record.endpoint = 'listing'\n            return denied\n",
        ("tests/test_processes.py::test_refused_requests_are_counted_by_what_they_asked_for",)),
    Mutation(
        "clib-example-default", "the agent's keep-alive timeout default moves away from the example's",
        "diskover_storage_agent/config.py", "DEFAULT_KEEPALIVE_TIMEOUT = 75.0", "DEFAULT_KEEPALIVE_TIMEOUT = 90.0",
        ("tests/test_fresh_machine.py::test_example_config_comments_show_the_applied_defaults",)),
    # -- wire: the shared protocol package, its codecs, the .pyz and the lean installs -----------
    Mutation(
        "wire-pyz-compiled", "build-pyz packs a compiled module without failing",
        "../contrib/build-pyz", "    if compiled:\n", "    if compiled and False:\n",
        ("tests/test_pyz.py::test_build_fails_on_a_compiled_module",)),
    Mutation(
        "wire-fallback-bytes", "msgpack's codec encodes floats as float32 (other bytes than msgspec's)",
        "diskover_wire/codec.py", "        return packer().pack(obj)\n",
        "        return packer(use_single_float=True).pack(obj)\n",
        ("tests/test_wire_codec.py::test_msgpack_bytes_are_the_same_with_every_codec",)),
    Mutation(
        "wire-agent-imports-client", "the agent takes its token check from the client again",
        "diskover_storage_agent/config.py", "from diskover_wire.tokens import token_problem\n",
        "from diskover_agent.transport import token_problem\n",
        ("tests/test_pyz.py::test_agent_imports_without_the_client_msgspec_and_tqdm",
         "tests/test_pyz.py::test_pyz_modules_import_on_a_bare_python")),
    Mutation(
        "wire-request-bool-loose", "the walk request takes any int where a bool is asked for",
        "diskover_wire/protocol.py", "            if type(value) is not bool:\n",
        "            if not isinstance(value, int):\n",
        ("tests/test_wire_codec.py::test_walk_request_bodies_decode_as_before",)),
    Mutation(
        "wire-pure-env-ignored", "DISKOVER_AGENT_PURE no longer chooses the pure-Python codec",
        "diskover_wire/codec.py", "= load(pure_wanted())", "= load(False)",
        ("tests/test_walk.py::test_awkward_tree_through_one_agent[subtree-pure]",)),
    # -- issue 14 integration: what the review found --------------------------------------------
    Mutation("cli-before-command-no-hint", "a subcommand's option before the subcommand is taken for the subcommand",
             "diskover_agent/cli/main.py", "            if owners:\n", "            if False:\n",
             ("tests/test_client_cli_habits.py::test_mistyped_options_and_commands_get_a_suggestion",)),
    Mutation("cli-version-unwritable", "-V into a full disk ends in a traceback",
             "diskover_agent/cli/main.py", "            if not exc.code:\n                sys.stdout.flush()\n", "",
             ("tests/test_client_cli_habits.py::test_version_option",)),
    # -- ckpt: the dataset's checkpoint, --resume, signals ------------------------------------
    Mutation(
        "ckpt-checkpoint-before-partition", "the checkpoint is saved before the partition it commits is written",
        "diskover_agent/dataset.py",
        "        if len(rows) or rows.dirs or empty:\n",
        "        self._save()\n        if len(rows) or rows.dirs or empty:\n",
        (RESUME_KILL_FIRST, RESUME_SIGINT),
    ),
    Mutation(
        "ckpt-frontier-omits-a-directory", "the saved frontier leaves out one directory owed",
        "diskover_agent/dataset.py",
        "Checkpoint(self.spec, asdict(s), self.frontier, s.complete)",
        "Checkpoint(self.spec, asdict(s), set(sorted(self.frontier)[1:]), s.complete)",
        (RESUME_KILL_FIRST, RESUME_KILL_MIDDLE),
    ),
    Mutation(
        "ckpt-resume-lists-committed-again", "a resume walks from the top again, not from the frontier",
        "diskover_agent/dataset_walk.py",
        "            roots = list(self.writer.frontier)\n",
        "            roots = [self.top]\n",
        (RESUME_KILL_FIRST,),
    ),
    Mutation(
        "ckpt-resume-keeps-uncommitted", "a resume keeps the partitions the checkpoint does not name",
        "diskover_agent/dataset.py",
        "        if _walk_files(name) and name not in kept and name not in (MANIFEST, ckpt.CHECKPOINT):",
        "        if name.endswith('.tmp'):",
        (RESUME_KILL_FIRST,),
    ),
    Mutation(
        "ckpt-interrupt-commits-nothing", "SIGINT/SIGTERM exit without committing what is complete",
        "diskover_agent/dataset_walk.py",
        "raise WalkInterrupted(stop.signum, self.writer.close()) from None",
        "raise WalkInterrupted(stop.signum, self.writer.summary) from None",
        (RESUME_SIGINT, RESUME_SIGTERM),
    ),
    Mutation(
        "ckpt-incomplete-said-complete", "an interrupted walk's checkpoint says it is complete",
        "diskover_agent/dataset.py",
        "        s.complete = not self.frontier\n",
        "        s.complete = True\n",
        (RESUME_KILL_FIRST, RESUME_SIGINT),
    ),
    Mutation(
        "ckpt-dask-frontier-forgets-running-tasks", "walk --dask's checkpoint leaves out the roots of running tasks",
        "diskover_agent/distributed.py",
        "{p for roots in owed.values() for p in roots}",
        "set()",
        (RESUME_DASK,),
    ),
    Mutation(
        "ckpt-resume-ignores-exclusions", "a resume with other exclusions is not refused",
        "diskover_agent/checkpoint.py",
        'for name in ("format", "stat", "exclude_dirs", "exclude_files", "one_fs", "max_depth"):',
        'for name in ("format", "stat", "one_fs", "max_depth"):',
        (RESUME_REFUSALS,),
    ),
    Mutation("scanner-storage-free-available-swapped", "get_storage_size swaps free and available bytes",
             "diskover_agent/scanner/api.py", 'return result["total"], result["free"], result["available"]',
             'return result["total"], result["available"], result["free"]',
             ("tests/test_diskover_scanner.py::test_get_storage_size_is_the_exported_directorys_statvfs",)),
]


def _pytest(tests: tuple[str, ...], src: Path, timeout: float) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(src), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    tail = [line for line in done.stdout.splitlines() if line.strip()][-1:] or [""]
    return done.returncode, tail[0]


#: The optional C extension (the agent's compiled read loop), built in place in a scratch copy.
C_SOURCE = "diskover_storage_agent/_readdir.c"


def _build_c(src: Path) -> None:
    """Build the scratch copy's compiled read loop from its (maybe broken) C source, with the
    repository's setup.py; the copy of the repository's own build is removed first, so a row
    never runs against the unbroken one. Exits when it does not build."""
    for old in (src / "diskover_storage_agent").glob("_readdir*.so"):
        old.unlink()
    root = src.parent
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, root / name)
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--build-temp",
                           str(root / "build")], cwd=root, capture_output=True, text=True)
    if not list((src / "diskover_storage_agent").glob("_readdir*.so")):
        sys.exit(f"mutations: the compiled read loop did not build in {root}:\n{done.stdout}{done.stderr}")


def _copy_src(tmp: str) -> Path:
    """A scratch copy of ``src/`` (with the repository's build of the compiled read loop), and of
    ``contrib/`` and ``packages/`` beside it (a row's file may be ``../contrib/build-pyz``: tests
    find these beside the ``src/`` they import from)."""
    src = Path(tmp) / "src"
    shutil.copytree(REPO / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("contrib", "packages"):
        shutil.copytree(REPO / name, Path(tmp) / name, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    _check_import_path(src)
    return src


def _check_import_path(src: Path) -> None:
    """The scratch copy must shadow the installed package, or no row means anything."""
    env = dict(os.environ, PYTHONPATH=str(src))
    for pkg in ("diskover_agent", "diskover_storage_agent", "diskover_wire"):
        out = subprocess.run([sys.executable, "-c", f"import {pkg}; print({pkg}.__file__)"],
                             env=env, capture_output=True, text=True, check=True).stdout.strip()
        if not out.startswith(str(src)):
            sys.exit(f"mutations: {pkg} is imported from {out}, not from the scratch copy {src}")


def run(mutation: Mutation, timeout: float) -> tuple[str, str]:
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        src = _copy_src(tmp)
        target = src / mutation.file
        text = target.read_text()
        if text.count(mutation.old) != 1:
            return "stale", f"{mutation.file}: the text to break occurs {text.count(mutation.old)} times"
        target.write_text(text.replace(mutation.old, mutation.new))
        if mutation.file == C_SOURCE:
            _build_c(src)
        rc, tail = _pytest(mutation.tests, src, timeout)
    if rc == 0:
        return "MISSED", tail
    if rc == 1 or rc == -1:
        return "caught", tail
    return f"error (pytest exit {rc})", tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="run only rows whose id contains this")
    parser.add_argument("--list", action="store_true", help="list the rows and their tests")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per row (default 600)")
    args = parser.parse_args(argv)
    rows = [m for m in MUTATIONS if args.k in m.id]
    if args.list:
        for m in rows:
            print(f"{m.id}\t{m.what}\t{' '.join(m.tests)}")
        return 0
    width = max((len(m.id) for m in rows), default=2)
    bad = 0
    for m in rows:
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="mutation-base-") as tmp:
            src = _copy_src(tmp)
            if m.file == C_SOURCE:
                _build_c(src)
            base_rc, base_tail = _pytest(m.tests, src, args.timeout)
        if base_rc != 0:
            verdict, tail = "broken", base_tail
        else:
            verdict, tail = run(m, args.timeout)
        bad += verdict != "caught"
        print(f"{m.id:<{width}}  {verdict:<8}  {time.monotonic() - started:6.1f} s  {m.what}  [{tail}]", flush=True)
    print(f"{len(rows) - bad} of {len(rows)} breakages caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
