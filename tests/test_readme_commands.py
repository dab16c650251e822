"""README.md and docs/*.md: every command they show works as written, every relative link
resolves, and README opens with the two commands (the quickstart's and CI's own).

Commands are the lines of ```bash blocks (continuations joined, `&&` chains split) and the
inline code spans that start like one (`python -m ...`, `launch/...`, `pip ...`). Each is
checked for real, as cheaply as that can be done without a no-op:

- a trailing `# error: MESSAGE` comment: run as written, exit code 2, MESSAGE its last line;
- `--help`, `--dry-run` (the launch scripts: always), `data.check` on the bundled data, and
  the TPU compilation of a tiny model: run as written, exit code 0;
- training, evaluation and `mlseg_jax.aot` (minutes to hours): run as written plus
  `--config.train.log_every=0`, which the config checks refuse after every flag has been
  parsed, the config file loaded, the overrides applied and the whole config checked: the
  command must end in exactly that one refusal (a misspelt flag, a missing config, a field
  that does not exist or a value that does not fit fails it);
- convert, export and prepare: their inputs are files you bring, so run as written, they
  must stop at the first missing input, naming it, in one `error:` line;
- the benchmarks: run plus an unknown flag, which must be the only thing refused;
- pip, venv and pytest: the files they name exist, the packages are in the requirements,
  and the test command is `.ci/run`'s;
- commands with placeholders (`configs/NAME.py`, `[--batch N]`): every flag they name is in
  the program's `--help` (config fields: in the quickstart's config).

Every repository path a command names must exist. The Python commands run in processes
forked from one server that has imported JAX, torch and the package once (each command
would otherwise spend seconds importing them), two at a time, in a scratch directory whose
entries link to the repository's, so nothing is written into the checkout.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
INJECTED_FIELD = "--config.train.log_every=0"
INJECTED_REFUSAL = "train.log_every=0 must be a positive integer"
UNKNOWN_ABSL_FLAG = "--readme_check_unknown_flag"
UNKNOWN_ARGPARSE_FLAG = "--readme-check-unknown-flag"
# Repository entries a command's paths may start with (checked to exist).
REPO_ENTRIES = ("configs/", "data/", "docs/", "launch/", "benchmarks/", "mlseg_jax/", "tests/",
                "requirements", ".ci/", "pyproject.toml")
PLACEHOLDER = re.compile(r"\b(NAME|DIR|FILE|WORKDIR|ROW|SLICE|N|F|X|HxW)\b|\.\.\.|\|")
# Flags whose values are the files a user brings (convert, export, prepare).
INPUT_FLAGS = ("--input", "--src", "--workdir", "--config.init_from")
PREFIXES = ("python -m ", "python3 -m ", "python ", "bash ", "launch/", "pip ")
# How each program is checked (see the module docstring).
CHECKS = {
    "mlseg_jax.main": "config_refusal",
    "mlseg_jax.aot": "config_refusal",
    "mlseg_jax.convert": "missing_input",
    "mlseg_jax.export": "missing_input",
    "mlseg_jax.data.prepare": "missing_input",
    "mlseg_jax.data.check": "runs",
    "benchmarks.bench": "absl_flags",
    "benchmarks.tpu_table": "argparse_flags",
    "benchmarks/data_pipeline.py": "argparse_flags",
    "benchmarks/eval_throughput.py": "argparse_flags",
    "launch/tpu_pod.sh": "dry_run",
    "launch/slurm_gpu.sh": "dry_run",
    "pytest": "ci",
    "pip": "pip",
    "venv": "chain",
    ".": "chain",
}
# Cheap enough to run for real although their program is checked otherwise (seconds).
RUN_FOR_REAL = [("mlseg_jax.aot", "--config quickstart --topology v5e-8 --notrain --sizes 120x160 "
                 "--images 8")]
# Stop at a missing input with a traceback instead of one `error:` line (a bug of theirs:
# the check still wants the input named).
KNOWN_TRACEBACKS = {"mlseg_jax.data.prepare coco_stuff10k", "mlseg_jax.data.prepare pascal_context"}


@dataclass
class Command:
  page: str
  line: int
  text: str
  argv: list[str]
  expect_error: str | None = None  # a trailing `# error: ...`
  template: bool = False

  @property
  def id(self) -> str:
    return f"{self.page}:{self.line}:{' '.join(self.argv)[:70]}"

  @property
  def program(self) -> str:
    a = self.argv
    if a[0] in ("python", "python3") and len(a) > 2 and a[1] == "-m":
      return a[2]
    if a[0] in ("python", "python3"):
      return a[1]
    if a[0] == "bash":
      return a[1]
    return a[0]

  @property
  def args(self) -> list[str]:
    a = self.argv
    if a[0] in ("python", "python3") and len(a) > 1:
      return a[3:] if a[1] == "-m" else a[2:]
    return a[2:] if a[0] == "bash" else a[1:]


# ---------------------------------------------------------------------------------------
# Reading the pages.

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def _split_chain(text: str) -> list[list[str]]:
  lexer = shlex.shlex(text, posix=True, punctuation_chars="&;")
  lexer.whitespace_split = True
  parts, current = [], []
  for token in lexer:
    if token in ("&&", ";"):
      parts.append(current)
      current = []
    else:
      current.append(token)
  return [p for p in parts + [current] if p]


def _logical_lines(block: str, first_line: int):
  """(line number, text) of a shell block's commands, continuations joined."""
  pending, start = "", None
  for i, raw in enumerate(block.split("\n")):
    if start is None:
      start = first_line + i
    if raw.rstrip().endswith("\\"):
      pending += raw.rstrip()[:-1] + " "
      continue
    line, pending = pending + raw, ""
    if line.strip():
      yield start, line.strip()
    start = None


def _commands_of_line(page: str, line: int, text: str, template: bool = False):
  if text.startswith("#"):
    return []
  expect = None
  m = re.search(r"\s#\s(.*)$", text)
  if m:
    comment, text = m.group(1).strip(), text[:m.start()].strip()
    if comment.startswith("error: "):
      expect = comment
  chain = _split_chain(text)
  return [Command(page, line, " ".join(argv), argv, expect,
                  template or any(map(is_placeholder, argv))) for argv in chain]


def is_placeholder(token: str) -> bool:
  """`NAME`, `configs/NAME.py`, `[--batch`, `N]`, `ade20k|HxW,...`: not to be run as is."""
  return (token.startswith("[") or (token.endswith("]") and "[" not in token)
          or bool(PLACEHOLDER.search(token)))


def page_commands(path: Path) -> list[Command]:
  text = path.read_text()
  page = str(path.relative_to(REPO))
  out = []
  for m in FENCE.finditer(text):
    lang, block = m.group(1), m.group(2)
    first = text.count("\n", 0, m.start(2)) + 1
    if lang in ("bash", "sh", "shell"):
      for line, command in _logical_lines(block, first):
        out += _commands_of_line(page, line, command)
    elif lang == "text":  # a synopsis: `python -m ...` with indented continuation lines
      for line, command in _logical_lines(re.sub(r"\n[ \t]+", " ", block), first):
        if command.startswith(PREFIXES):
          out += _commands_of_line(page, line, command, template=True)
  prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
  for m in re.finditer(r"`([^`]+)`", prose):
    span = " ".join(m.group(1).split())
    if span.startswith(PREFIXES):
      out += _commands_of_line(page, prose.count("\n", 0, m.start()) + 1, span)
  return out


def all_commands() -> list[Command]:
  return [c for p in PAGES for c in page_commands(p)]


def ci_lines() -> list[str]:
  """The commands of `.ci/run` after its setup lines."""
  lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
  return [ln for ln in lines if ln and not ln.startswith(("#", "set ", "cd "))]


# ---------------------------------------------------------------------------------------
# Running the Python commands: a server imports the heavy modules once, then forks a child
# per command (`python -m MODULE ARGS` is `runpy.run_module(MODULE, "__main__")`); scripts and
# shell scripts run as processes of their own.

PRELOAD = ("jax", "jax.numpy", "flax.linen", "optax", "orbax.checkpoint", "grain", "torch",
           "cv2", "mlseg_jax.configs.common", "mlseg_jax.configs.validate", "mlseg_jax.train",
           "mlseg_jax.evaluation.evaluators", "mlseg_jax.evaluation.modes", "mlseg_jax.checkpoints",
           "mlseg_jax.pretrained", "mlseg_jax.sharding")


def _serve(jobs_file: str, results_file: str, parallel: int = 2) -> None:
  import importlib
  import runpy

  sys.path.insert(0, os.getcwd())
  for module in PRELOAD:
    try:
      importlib.import_module(module)
    except ImportError:
      pass
  jobs = json.loads(Path(jobs_file).read_text())
  results, running = {}, {}

  def start(i, job):
    handle, name = tempfile.mkstemp(prefix="readme_command_", suffix=".txt")
    os.close(handle)
    out = Path(name)
    pid = os.fork()
    if pid == 0:  # the child: this command's process
      code = 1
      try:
        fd = os.open(out, os.O_WRONLY)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        signal.alarm(180)  # a command that hangs ends (SIGALRM) instead of the test
        sys.argv = [job["module"], *job["args"]]
        runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
        code = 0
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
          print(e.code, file=sys.stderr)
      except BaseException:  # noqa: BLE001 -- reported as the command's own traceback
        import traceback

        traceback.print_exc()
      finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    running[pid] = (i, out)

  queue = list(enumerate(jobs))
  while queue or running:
    while queue and len(running) < parallel:
      start(*queue.pop(0))
    pid, status = os.wait()
    i, out = running.pop(pid)
    results[i] = {"rc": os.waitstatus_to_exitcode(status),
                  "output": out.read_text(errors="replace")}
    out.unlink()
  Path(results_file).write_text(json.dumps([results[i] for i in range(len(jobs))]))


def _sandbox(root: Path) -> Path:
  """`root`, its entries linked to the repository's."""
  for entry in REPO.iterdir():
    if entry.name not in (".venv", "workdir"):
      (root / entry.name).symlink_to(entry)
  return root


def _environment() -> dict:
  env = dict(os.environ)
  for name in ("XLA_FLAGS", "MLSEG_TRACEBACK", "PYTHONPATH"):
    env.pop(name, None)  # a user's machine: one CPU device, one-line errors
  env["JAX_PLATFORMS"] = "cpu"
  return env


def run_python(jobs: list[tuple[str, list[str]]], cwd: Path) -> list[dict]:
  """[(module, args)] -> [{rc, output}], through the forking server."""
  spec = [{"module": m, "args": a} for m, a in jobs]
  with tempfile.TemporaryDirectory() as tmp:
    jobs_file, results_file = Path(tmp, "jobs.json"), Path(tmp, "results.json")
    jobs_file.write_text(json.dumps(spec))
    subprocess.run([sys.executable, __file__, str(jobs_file), str(results_file)], cwd=cwd,
                   env=_environment(), check=True, timeout=600)
    return json.loads(results_file.read_text())


# ---------------------------------------------------------------------------------------
# What each command must do.


def _last_line(output: str) -> str:
  lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
  return lines[-1] if lines else ""


def _plan(c: Command) -> tuple[str, list[str]] | None:
  """(how, args to run) for a Python command that runs, or None."""
  if c.template:
    return None
  args = c.args
  if c.expect_error:
    return "expect_error", args
  if not args or "--help" in args:
    return "help", args or ["--help"]
  if (c.program, " ".join(args)) in RUN_FOR_REAL:
    return "runs", args
  how = CHECKS.get(c.program)
  if how == "config_refusal":
    return how, args + [INJECTED_FIELD]
  if how == "absl_flags":
    return how, args + [UNKNOWN_ABSL_FLAG]
  if how == "argparse_flags":
    return how, args + [UNKNOWN_ARGPARSE_FLAG]
  if how in ("missing_input", "runs"):
    return how, args
  return None


def judge(c: Command, how: str, rc: int, output: str) -> str | None:
  """What is wrong with a command's run, or None."""
  last = _last_line(output)
  tail = output[-1500:]
  if how == "expect_error":
    if rc != 2 or last != c.expect_error:
      return f"expected exit 2 and {c.expect_error!r}, got {rc}:\n{tail}"
  elif how in ("help", "runs"):
    if rc != 0:
      return f"exit code {rc}:\n{tail}"
  elif how == "config_refusal":
    refusal = output[output.rfind("error: invalid config:"):] if "error: invalid config:" in output else ""
    problems = [ln.strip() for ln in refusal.splitlines()[1:] if ln.strip()]
    if rc != 2 or problems != [INJECTED_REFUSAL]:
      return (f"expected only the injected refusal ({INJECTED_REFUSAL}) with exit 2, "
              f"got {rc}:\n{tail}")
  elif how == "absl_flags":
    if rc != 2 or last != f"error: Unknown command line flag '{UNKNOWN_ABSL_FLAG[2:]}'":
      return f"expected only {UNKNOWN_ABSL_FLAG} refused, got {rc}:\n{tail}"
  elif how == "argparse_flags":
    if rc != 2 or not last.endswith(f"error: unrecognized arguments: {UNKNOWN_ARGPARSE_FLAG}"):
      return f"expected only {UNKNOWN_ARGPARSE_FLAG} refused, got {rc}:\n{tail}"
  elif how == "missing_input":
    args = c.args
    inputs = [args[i + 1] for i, a in enumerate(args[:-1]) if a in INPUT_FLAGS]
    inputs += [a.split("=", 1)[1] for a in args if a.split("=", 1)[0] in INPUT_FLAGS and "=" in a]
    named = [p for p in inputs if p in output]
    one_line = rc == 2 and last.startswith("error: ")
    known = any(f"{c.program} {' '.join(c.args)}".startswith(k) for k in KNOWN_TRACEBACKS)
    if not named or (rc == 0) or not (one_line or known):
      return f"expected a one-line error naming a missing input {inputs}, got {rc}:\n{tail}"
  return None


def _flag_names(text: str) -> set[str]:
  names = set()
  for no, name in re.findall(r"--(\[no\])?([A-Za-z][\w.-]*)", text):
    names.add(name)
    if no:
      names.add("no" + name)
  return names


def _config_has(path: str) -> bool:
  from mlseg_jax.configs import quickstart

  node = quickstart.get_config()
  for key in path.split("."):
    if key in ("X", "...") or not key:
      return True  # a placeholder field
    if key not in node:
      return False
    node = node[key]
  return True


def _template_problems(c: Command, helps: dict) -> list[str]:
  known = helps.get(c.program)
  problems = []
  for token in re.findall(r"--[\w.\[\]-]+", " ".join(c.argv)):
    for flag in token.strip("[]").split("|"):
      name = flag.lstrip("-").split("=")[0].strip("[]")
      if name.startswith("config.") and c.program in CHECKS:
        if not _config_has(name[len("config."):]):
          problems.append(f"--{name}: not a config field")
      elif known is not None and name not in known:
        problems.append(f"--{name}: not a flag of {c.program} (its --help)")
  return problems


def _repo_paths(c: Command) -> list[str]:
  missing = []
  for arg in c.args + [c.program]:
    value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg
    if value.startswith(REPO_ENTRIES) and not is_placeholder(value):
      if not (REPO / value.split(":")[0]).exists():
        missing.append(value)
  return missing


def _requirement_names() -> set[str]:
  names = set()
  for req in REPO.glob("requirements*.txt"):
    for line in req.read_text().splitlines():
      m = re.match(r"\s*([A-Za-z0-9_.\-]+(\[[\w,]+\])?)", line.split("#")[0])
      if m:
        names.add(m.group(1).lower())
        names.add(re.sub(r"\[.*\]", "", m.group(1)).lower())
  return names


def _pip_problems(c: Command) -> list[str]:
  args, problems = c.args, []
  if args[:1] not in (["install"], ["wheel"]):
    return [f"pip {args[:1]}: not install or wheel"]
  names = _requirement_names()
  i = 1
  while i < len(args):
    a = args[i]
    if a == "-r":
      if not (REPO / args[i + 1]).is_file():
        problems.append(f"-r {args[i + 1]}: no such file")
      i += 2
      continue
    if a == ".":
      if not (REPO / "pyproject.toml").is_file():
        problems.append(". has no pyproject.toml")
    elif not a.startswith("-") and a != "pip":
      name = re.match(r"[A-Za-z0-9_.\-]+(\[[\w,]+\])?", a).group(0).lower()
      if name not in names:
        problems.append(f"{a}: not in requirements*.txt")
    i += 1
  return problems


def run_subprocess(argv: list[str], cwd: Path) -> dict:
  """A script or a shell script, as its own process (nothing of it is preloaded)."""
  run = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120,
                       env=_environment())
  return {"rc": run.returncode, "output": run.stdout + run.stderr}


def _runner(c: Command) -> str:
  """How a command is started: "python" (forked server), "process" or "" (not run)."""
  if c.program.endswith(".sh") or c.program.endswith(".py"):
    return "process"
  if CHECKS.get(c.program) in ("pip", "ci", "chain"):
    return ""
  return "python"


def _argv(c: Command, args: list[str]) -> list[str]:
  if c.program.endswith(".sh"):
    return ["bash", c.program, *args]
  return [sys.executable, c.program, *args]


def _dry_run_args(c: Command) -> list[str]:
  args = [a.strip("[]") for a in c.args]
  if not args:
    return ["--help"]
  return args if "--dry-run" in args else args + ["--dry-run"]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
  """{command id: what is wrong with it, or None}, for README's and docs' commands and a
  canary with a misspelt flag."""
  commands = all_commands()
  canary = _commands_of_line("canary", 0, "python -m mlseg_jax.main --config "
                             "configs/quickstart.py --wrkdir workdir/quickstart")[0]
  everything = commands + [canary]
  cwd = _sandbox(tmp_path_factory.mktemp("readme_commands"))
  plans = {}
  for c in everything:
    if c.template or not _runner(c):
      continue
    if CHECKS.get(c.program) == "dry_run":
      plans[id(c)] = ("runs", _dry_run_args(c))
    else:
      plans[id(c)] = _plan(c)
  # --help of every program a template names: the flags it may use.
  helps_of = sorted({c.program for c in commands if c.template and _runner(c)})

  forked = [c for c in everything if plans.get(id(c)) and _runner(c) == "python"]
  jobs = [(c.program, plans[id(c)][1]) for c in forked]
  jobs += [(m, ["--help"]) for m in helps_of if _runner_of(m) == "python"]
  results = iter(run_python(jobs, cwd))
  ran = {id(c): next(results) for c in forked}
  helps = {m: next(results) for m in helps_of if _runner_of(m) == "python"}
  for c in everything:
    if plans.get(id(c)) and _runner(c) == "process":
      ran[id(c)] = run_subprocess(_argv(c, plans[id(c)][1]), cwd)
  for m in helps_of:
    if _runner_of(m) == "process":
      helps[m] = run_subprocess(["bash", m, "--help"] if m.endswith(".sh")
                                else [sys.executable, m, "--help"], cwd)
  helps = {m: _flag_names(r["output"]) for m, r in helps.items()}

  ci = ci_lines()
  out = {}
  for c in everything:
    problems = [f"{p}: not in the repository" for p in _repo_paths(c)]
    how = CHECKS.get(c.program)
    if c.template:
      problems += _template_problems(c, helps)
      if c.program not in helps and how not in ("pip", "ci", "chain"):
        problems.append(f"no check for {c.program}: add it to CHECKS")
    elif id(c) in ran:
      r = ran[id(c)]
      problem = judge(c, plans[id(c)][0], r["rc"], r["output"])
      problems += [problem] if problem else []
    elif how == "pip":
      problems += _pip_problems(c)
    elif how in ("ci", "chain"):
      if " ".join(c.argv) not in ci:
        problems.append(f"not one of .ci/run's lines ({ci})")
    else:
      problems.append(f"no check for {c.program}: add it to CHECKS")
    out[c.id] = "; ".join(problems) or None
  return out, canary


def _runner_of(program: str) -> str:
  return "process" if program.endswith((".sh", ".py")) else "python"


COMMANDS = all_commands()


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_command_works_as_written(outcomes, command):
  problems, _ = outcomes
  assert problems[command.id] is None, f"{command.page}:{command.line}: {command.text}\n" \
                                        f"{problems[command.id]}"


def test_a_misspelt_flag_fails_the_check(outcomes):
  problems, canary = outcomes
  assert problems[canary.id] and "wrkdir" in problems[canary.id]


def test_readme_opens_with_the_quickstart_and_the_ci_commands():
  text = (REPO / "README.md").read_text()
  opening = text[:text.index("\n## ")]
  blocks = [m.group(2).strip() for m in FENCE.finditer(opening) if m.group(1) == "bash"]
  assert len(blocks) == 2, "README opens with two commands, before its first section"
  quickstart, tests = (_split_chain(b) for b in blocks)
  ci = ci_lines()
  assert [" ".join(a) for a in tests] == ci, "the test command is .ci/run's lines"
  assert [" ".join(a) for a in quickstart[:3]] == ci[:3]
  assert " ".join(quickstart[3]) == ci[3].replace(" -r requirements-test.txt", "")
  assert " ".join(quickstart[4]).startswith(
      "python -m mlseg_jax.main --config configs/quickstart.py --workdir ")


def test_commands_are_found():
  """The extraction sees the commands (an empty list would pass everything)."""
  programs = {c.program for c in COMMANDS}
  assert {"mlseg_jax.main", "mlseg_jax.aot", "mlseg_jax.convert", "mlseg_jax.export",
          "launch/tpu_pod.sh", "pytest", "pip"} <= programs
  assert len(COMMANDS) > 40


def python_blocks() -> list[tuple[str, int, str]]:
  out = []
  for path in PAGES:
    text = path.read_text()
    for m in FENCE.finditer(text):
      if m.group(1) == "python":
        out.append((str(path.relative_to(REPO)), text.count("\n", 0, m.start(2)) + 1,
                    m.group(2)))
  return out


@pytest.mark.parametrize("page,line,source", python_blocks(),
                         ids=[f"{p}:{n}" for p, n, _ in python_blocks()])
def test_python_snippet_uses_what_exists(page, line, source):
  """It compiles; every `mlseg_jax.X` it names exists; `predict` takes its keywords."""
  import inspect

  import mlseg_jax

  compile(source, f"{page}:{line}", "exec")
  for chain in re.findall(r"\bmlseg_jax((?:\.\w+)+)", source):
    obj = mlseg_jax
    for name in chain.strip(".").split("."):
      assert hasattr(obj, name), f"mlseg_jax{chain}: no {name}"
      obj = getattr(obj, name)
  parameters = inspect.signature(mlseg_jax.Segmenter.predict).parameters
  for keywords in re.findall(r"\.predict\(([^()]*)\)", source):
    for name in re.findall(r"(\w+)=", keywords):
      assert name in parameters, f"Segmenter.predict has no {name}="


# ---------------------------------------------------------------------------------------
# Links.


def _slug(heading: str) -> str:
  """GitHub's anchor of a heading."""
  text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
  seen, out = {}, set()
  text = FENCE.sub("", path.read_text())
  for m in re.finditer(r"^#{1,6} (.+)$", text, re.M):
    slug = _slug(m.group(1))
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    out.add(slug if n == 0 else f"{slug}-{n}")
  return out


def broken_links(path: Path) -> list[str]:
  text = FENCE.sub("", path.read_text())
  text = re.sub(r"`[^`]*`", "", text)
  broken = []
  for target in re.findall(r"\]\(([^)\s]+)\)", text):
    if re.match(r"[a-z]+:", target):
      continue
    file, _, anchor = target.partition("#")
    resolved = (path.parent / file).resolve() if file else path
    if not resolved.exists():
      broken.append(f"{target}: no such file")
    elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
      broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
  return broken


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_resolve(page):
  assert broken_links(page) == []


def test_every_docs_page_is_linked_from_readme():
  readme = (REPO / "README.md").read_text()
  unlinked = [p.name for p in PAGES[1:] if f"](docs/{p.name}" not in readme]
  assert unlinked == []


def test_a_broken_link_is_found(tmp_path):
  page = tmp_path / "page.md"
  (tmp_path / "other.md").write_text("# A heading\n")
  page.write_text("[ok](other.md#a-heading) [gone](missing.md) [bad](other.md#nothing)\n"
                  "`[in code](missing.md)`\n")
  assert broken_links(page) == ["missing.md: no such file",
                                "other.md#nothing: no heading #nothing in other.md"]


if __name__ == "__main__":
  _serve(sys.argv[1], sys.argv[2])
