"""Every ``mner-features`` / ``mner-train`` command in README.md, docs/, the model pages, sample/run.sh and
the bench/*.sh scripts names real
sub-commands, real flags and valid values, checked against the live CLIs (click introspection of the
typer apps, the model registry, presets and ``--set`` keys, the detector / encoder / prompt-set
registries). Nothing is executed: no data is read and no model is built.

Fenced code blocks are commands to run as written; an inline code span is checked for its names only
(``...`` stands for omitted options in either)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SCRIPTS = [ROOT / "sample" / "run.sh", *sorted((ROOT / "bench").glob("*.sh"))]  # commands the docs point at
PROGRAMS = {"mner-features": "features", "mner-train": "trainer",
            "mner.features.cli": "features", "mner.trainer.cli": "trainer"}
SEPARATORS = {"&&", "||", ";", "|", "&", "do", "then", "\n"}  # a command starts after one of these
ENDS = SEPARATORS | {";;", ")", "done", "fi"}  # and ends before one of these
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
INLINE = re.compile(r"`(mner-(?:features|train)\b[^`]*)`")


@dataclass
class DocCommand:
    where: str  # file:line
    program: str  # "features" | "trainer"
    argv: list[str]
    literal: bool  # from a fenced block: must run as written (required options present)

    def __str__(self) -> str:
        return f"{self.where}: {' '.join(self.argv)}"


def shell_words(text: str) -> list[str]:
    """Shell words, line continuations joined, comments dropped; "\n" ends each line. A line that is
    not valid shell (prose in a text block) is skipped unless it starts with an mner program."""
    words = []
    for line in text.replace("\\\n", " ").split("\n"):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            words += [*lexer, "\n"]
        except ValueError as err:
            if line.split()[:1] and line.split()[0] in PROGRAMS:
                raise ValueError(f"{line!r}: {err}") from None
    return words


def at_command_start(words: list[str], i: int) -> bool:
    """words[i] is where a shell command starts: line start, after a separator, an env assignment,
    or a wrapper (time, nohup, nice -n N, timeout N)."""
    j = i - 1
    while j >= 0 and (ENV.match(words[j]) or words[j] in ("time", "nohup", "exec")):
        j -= 1
    if j >= 1 and words[j - 1] in ("timeout", "-n") and words[j].isdigit():
        j -= 2 if words[j - 1] == "timeout" else 3  # timeout N / nice -n N
    return j < 0 or words[j] in SEPARATORS


def commands_in(words: list[str]) -> list[list[str]]:
    """Each mner command's words, from its program to the next shell separator."""
    found, i = [], 0
    while i < len(words):
        word = words[i]
        program = PROGRAMS.get(word) if word in ("mner-features", "mner-train") and at_command_start(words, i) \
            else None
        if program is None and word == "-m" and i + 1 < len(words) and words[i + 1] in PROGRAMS:
            program, i = PROGRAMS[words[i + 1]], i + 1
        if program is None:
            i += 1
            continue
        end = i + 1
        while end < len(words) and words[end] not in ENDS:
            end += 1
        found.append([program, *words[i + 1:end]])
        i = end
    return found


def doc_commands(path: Path) -> list[DocCommand]:
    text = path.read_text(encoding="utf-8")
    name = str(path.relative_to(ROOT))
    if path.suffix == ".sh":
        return [DocCommand(name, program, argv, literal=True) for program, *argv in commands_in(shell_words(text))]
    result = []
    for block in FENCE.finditer(text):
        line = text.count("\n", 0, block.start(2)) + 1
        if block.group(1).strip() not in SHELL_FENCES or "mner" not in block.group(2):
            continue
        try:
            words = shell_words(block.group(2))
        except ValueError as err:
            raise AssertionError(f"{name}:{line}: the code block is not valid shell: {err}") from None
        for program, *argv in commands_in(words):
            result.append(DocCommand(f"{name}:{line}", program, argv, literal=True))
    outside = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for span in INLINE.finditer(outside):
        line = outside.count("\n", 0, span.start()) + 1
        try:
            words = shell_words(span.group(1))
        except ValueError:
            continue
        for program, *argv in commands_in(words):
            result.append(DocCommand(f"{name}:{line}", program, argv, literal=False))
    return result


def cli_group(program: str):
    if program == "features":
        from mner.features.cli import app
    else:
        from mner.trainer.cli import app
    return typer.main.get_command(app)


def options_of(command) -> dict:
    # duck-typed: typer may build its commands on its own copy of click
    return {name: param for param in command.params if param.param_type_name == "option"
            for name in (*param.opts, *param.secondary_opts)}


def is_placeholder(word: str) -> bool:
    return word == "..." or "$" in word or word.startswith("<")


def problems_of(doc: DocCommand) -> list[str]:
    """What is wrong with one documented command (empty when it matches the CLI)."""
    group = cli_group(doc.program)
    argv = list(doc.argv)
    if not argv or argv[0] in ("--help", "-h"):
        return []
    if doc.program == "trainer" and argv[0] not in group.commands:
        argv.insert(0, "train")  # mner-train's default command
    if argv[0] not in group.commands:
        return [f"unknown sub-command {argv[0]!r}; valid: {', '.join(sorted(group.commands))}"]
    command = group.commands[argv[0]]
    options, problems, given, positional, expansions = options_of(command), [], {}, [], []
    words = iter(argv[1:])
    for word in words:
        if word in ("--help", "-h", "..."):
            continue
        if word.startswith("-") and len(word) > 1 and not is_placeholder(word):
            name, _, inline_value = word.partition("=")
            param = options.get(name)
            if param is None:
                problems.append(f"{argv[0]}: unknown option {name}")
                continue
            value = None
            if not (param.is_flag or getattr(param, "count", False)):
                value = inline_value or next(words, None)
                if value is None and not doc.literal:
                    continue  # prose naming an option: `mner-train sweep --set`
                if value is None:
                    problems.append(f"{argv[0]}: {name} needs a value")
                    continue
                choices = getattr(getattr(param, "type", None), "choices", None)
                if choices is not None and not is_placeholder(value) and value not in choices:
                    problems.append(f"{argv[0]}: {name} {value!r}; valid: {', '.join(choices)}")
            given.setdefault(param.name, []).append(value)
        else:
            (expansions if is_placeholder(word) else positional).append(word)
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    # a shell expansion ($OUT, "${COMMON[@]}") fills a missing argument, else it stands for options
    positional += expansions[:max(0, len(arguments) - len(positional))]
    for argument, value in zip(arguments, positional):
        given.setdefault(argument.name, []).append(value)
    if not any(p.nargs == -1 for p in arguments) and len(positional) > len(arguments):
        problems.append(f"{argv[0]}: unexpected argument(s) {positional[len(arguments):]}")
    if doc.literal and "..." not in argv:
        missing = [p.opts[0] for p in command.params if p.required and p.param_type_name == "option"
                   and p.name not in given]
        if arguments and arguments[0].required and not positional:
            missing.append(arguments[0].name.upper())
        if missing:
            problems.append(f"{argv[0]}: missing {', '.join(missing)}")
    problems += semantic_problems(doc.program, argv[0], given)
    return problems


def semantic_problems(program: str, command: str, given: dict[str, list]) -> list[str]:
    """Values the CLI checks only when it runs: model names, presets, --set keys, component names."""
    plain = {name: [v for v in values if v is not None and not is_placeholder(v)] for name, values in given.items()}
    problems = []
    if program == "trainer" and command == "train" and not any(
            is_placeholder(v) for v in [*given.get("model", []), *given.get("preset", [])]):
        from mner.trainer.core.config import ConfigError, resolve_configs
        from mner.trainer.gmner.config import split_gmner_sets
        from mner.trainer.models import get_model_class

        model = (plain.get("model") or ["bert_crf"])[-1]
        try:  # gmner_* keys are checked (and need --boxes) as the trainer does
            sets, _ = split_gmner_sets(plain.get("set_") or None, boxes=(plain.get("boxes") or [None])[-1])
            resolve_configs(get_model_class(model), preset=(plain.get("preset") or [None])[-1], sets=sets or None)
        except KeyError as err:
            problems.append(str(err.args[0]))
        except ConfigError as err:
            problems.append(str(err))
    if program == "features" and command == "extract":
        from mner.features.producers.detectors import DETECTORS
        from mner.features.producers.encoders import ENCODERS
        from mner.features.producers.prompts import available_prompt_sets

        for name in plain.get("detector", []):
            if name not in DETECTORS:
                problems.append(f"--detector {name!r}; valid: {', '.join(sorted(DETECTORS))}")
        for name in plain.get("encoder", []):
            if name not in ENCODERS:
                problems.append(f"--encoder {name!r}; valid: {', '.join(sorted(ENCODERS))}")
        for name in plain.get("prompts", []):
            if name not in available_prompt_sets() and not name.endswith(".json"):
                problems.append(f"--prompts {name!r}; valid: {', '.join(available_prompt_sets())} or FILE.json")
    if program == "trainer" and command == "sweep":
        for grid in plain.get("grid", []):
            if grid.startswith("grids/") and not (ROOT / grid).is_file():
                problems.append(f"no grid file {grid}")
    return problems


def parsed_options(doc: DocCommand) -> dict[str, list[str]]:
    """Option name (``--out``) -> the values given (flags: ["true"])."""
    argv = doc.argv if doc.argv[:1] != ["train"] else doc.argv[1:]
    command = cli_group(doc.program).commands.get(argv[0] if doc.program == "features" else "train")
    options, found, words = options_of(command), {}, iter(argv)
    for word in words:
        name, _, inline_value = word.partition("=")
        param = options.get(name)
        if param is None:
            continue
        takes_value = not (param.is_flag or getattr(param, "count", False))
        found.setdefault(param.opts[0], []).append((inline_value or next(words, "")) if takes_value else "true")
    return found


def extract_default(option: str) -> str | list[str]:
    command = cli_group("features").commands["extract"]
    param = options_of(command)[option]
    return [str(v) for v in param.default] if isinstance(param.default, (list, tuple)) else str(param.default)


DEFAULT_INSTANCES = {"--detector": ["maskrcnn"], "--clip-model": ["ViT-B-32"], "--encoder": ["clip"]}


def stage1_problems(extract: DocCommand, train: DocCommand) -> list[str]:
    """The paper instances and settings of the trained model that the documented extract command does not give:
    ``--for <model>`` / ``--for all`` gives them all; otherwise the flags that make each group instance the model
    reads (its specs' options: --detector, --encoder, --clip-model, --prompts) and the settings' flags."""
    from mner.pipeline.cache import extract_command_hint
    from mner.trainer.core.config import resolve_configs
    from mner.trainer.models import get_model_class
    from mner.trainer.models.stage1 import model_stage1_settings

    given = parsed_options(train)
    model = (given.get("--model") or ["bert_crf"])[-1]
    model_cls = get_model_class(model)
    from mner.trainer.gmner.config import split_gmner_sets

    sets, _ = split_gmner_sets(given.get("--set"), boxes=(given.get("--boxes") or [None])[-1])
    model_config, _ = resolve_configs(model_cls, preset=(given.get("--preset") or [None])[-1], sets=sets or None)
    extracted, problems = parsed_options(extract), []
    if {"all", model} & set(extracted.get("--for") or []):
        return []  # the plan builds what the paper preset and its ablation rows read
    hint = extract_command_hint(model_cls.required_features(model_config)).split("--out <cache.h5>", 1)[1]
    for name, wanted in flag_pairs(hint):  # the instances the model reads
        values = extracted.get(name) or DEFAULT_INSTANCES.get(name) or extract_default(name)
        values = values if isinstance(values, list) else [values]
        if name == "--swin-model":
            values = [v.rstrip("/").rsplit("/", 1)[-1] for v in values]
        if wanted is not None and wanted not in values and not (name == "--encoder" and wanted in
                                                                  ("clip", "swin") and name in extracted):
            problems.append(f"{model} reads the {name} {wanted} instance: the extract command gives {name} "
                            f"{' '.join(values)}; add {name} {wanted} (or use --for {model})")
    for setting in model_stage1_settings(model_cls, model_config):
        for name, wanted in flag_pairs(setting.flags):
            values = extracted.get(name) or extract_default(name)
            values = values if isinstance(values, list) else [values]
            # a repeated flag (--encoder, one --clip-model per instance) serves the setting when one value does
            if wanted is None:
                ok = name in extracted
            elif setting.match == "at_least":
                ok = any(_number(v) is not None and _number(v) >= float(wanted) for v in values)
            elif setting.match == "at_most":  # the cache holds a superset the model cuts when reading
                ok = any(_number(v) is not None and _number(v) <= float(wanted) for v in values)
            else:
                ok = any(v == wanted or (_number(v) is not None and _number(v) == _number(wanted)) for v in values)
            if not ok:
                problems.append(f"{setting.describe()}: the extract command gives {name} "
                                f"{' '.join(str(v) for v in values)}; add {setting.flags}")
    return problems


def flag_pairs(flags: str) -> list[tuple[str, str | None]]:
    """"--grounding owlv2 --grounding-clip" -> [("--grounding", "owlv2"), ("--grounding-clip", None)]."""
    words, pairs = shlex.split(flags), []
    for i, word in enumerate(words):
        if word.startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else None
            pairs.append((word, value))
    return pairs


def _number(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def cache_pairs(docs: list[DocCommand]) -> list[tuple[DocCommand, DocCommand]]:
    """(extract, train) pairs of one page where the train command reads the cache the extract writes,
    trains a model whose paper settings are checked (not --set stage1_mismatch=warn) and the extract
    is written out (no ``...``, no plan from --for)."""
    pairs = []
    for train in docs:
        if train.program != "trainer" or not train.literal or (train.argv[:1] not in (["train"],) and
                                                              train.argv[:1] and train.argv[0] in
                                                              ("evaluate", "predict", "sweep", "report")):
            continue
        given = parsed_options(train)
        if "stage1_mismatch=warn" in given.get("--set", []) or not given.get("--features"):
            continue
        if any(is_placeholder(v) for v in [*given.get("--model", []), *given.get("--preset", [])]):
            continue
        page = train.where.split(":")[0]
        for extract in docs:
            if (extract.program == "features" and extract.argv[:1] == ["extract"] and extract.literal
                    and extract.where.split(":")[0] == page and "..." not in extract.argv
                    and "--for" not in extract.argv
                    and (parsed_options(extract).get("--out") or [extract_default("--out")])[-1]
                    == given["--features"][-1]):
                pairs.append((extract, train))
    return pairs


ALL = [doc for path in [*DOCS, *SCRIPTS] for doc in doc_commands(path)]
PAIRS = cache_pairs(ALL)


def test_the_docs_hold_commands_of_both_programs():
    assert sum(doc.literal for doc in ALL) >= 40, len(ALL)  # the parser finds the fenced commands
    assert {doc.program for doc in ALL} == {"features", "trainer"}
    assert any(doc.where.startswith("README.md") and doc.literal for doc in ALL)
    assert any(doc.where.startswith("sample/run.sh") for doc in ALL)


@pytest.mark.parametrize("doc", ALL, ids=str)
def test_documented_command_matches_the_cli(doc):
    assert not problems_of(doc), f"{doc}\n  " + "\n  ".join(problems_of(doc))


@pytest.mark.parametrize("pair", PAIRS, ids=lambda pair: f"{pair[1].where} <- {pair[0].where}")
def test_documented_cache_serves_the_documented_training(pair):
    """A page that extracts a cache and trains a model on it extracts what the model's paper needs,
    so the training is not refused for its stage-1 settings."""
    extract, train = pair
    problems = stage1_problems(extract, train)
    assert not problems, f"{train}\n  reads {extract}\n  " + "\n  ".join(problems)


def test_the_checker_names_what_is_wrong():
    def problems(text: str) -> list[str]:
        (program, *argv), = commands_in(shell_words(text))
        return problems_of(DocCommand("x.md:1", program, argv, literal=True))

    assert problems("mner-train --data d --model vcrmner --preset paper --out r") == []
    assert problems("mner-features extract --data d --no-images --encoder clip-test --prompts vcrmner") == []
    assert "train: unknown option --epoch" in problems("mner-train --data d --epoch 3")
    assert problems("mner-train evalute runs/x")[0].startswith("train: unexpected argument")
    assert "unknown sub-command 'inspect'" in problems("mner-features inspect cache/t15.h5")[0]
    assert "unknown preset 'nope'" in problems("mner-train --data d --model vcrmner --preset nope")[0]
    assert "unknown config key 'colour'" in problems("mner-train --data d --set colour=red")[0]
    assert "--encoder 'vgg'" in problems("mner-features extract --data d --no-images --encoder vgg")[0]
    assert problems("mner-features extract --images i") == ["extract: missing --data"]
    assert problems("mner-train sweep grids/none.toml --dry-run") == ["no grid file grids/none.toml"]
    extract, train = (DocCommand("x.md:1", program, argv, literal=True) for program, *argv in commands_in(shell_words(
        "mner-features extract --data d --images i --out c.h5 --detector maskrcnn --prompts vcrmner\n"
        "mner-train --features c.h5 --model vcrmner --preset paper")))
    assert flag_pairs("--grounding owlv2 --grounding-clip") == [("--grounding", "owlv2"), ("--grounding-clip", None)]
    assert cache_pairs([extract, train]) == [(extract, train)]
    assert any("--clip-model ViT-B-16" in line for line in stage1_problems(extract, train))


@pytest.mark.parametrize("program,argv", [
    ("trainer", ["--data", "d", "--epoch", "3"]), ("trainer", ["evaluate"]),
    ("features", ["extract", "--data", "d", "--detectr", "maskrcnn"]), ("features", ["inspect", "c.h5"]),
])
def test_a_wrong_command_is_a_usage_error_not_a_traceback(program, argv, capsys):
    """What the checker above refuses, the CLIs refuse too: exit 2 with a usage message, whichever click
    typer parses with (recent typer releases ship their own copy)."""
    if program == "trainer":
        from mner.trainer.cli import main
    else:
        from mner.features.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Usage:" in err and "Traceback" not in err


REPO_PATH = r"(?<![\w/.])((?:bench|sample|grids|tests|docs|\.ci)/[\w./-]*\.(?:py|sh|toml|md))"


def test_files_and_modules_the_docs_name_exist():
    import importlib.util

    paths, modules = set(), set()
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        paths |= set(re.findall(REPO_PATH, text))
        modules |= set(re.findall(r"python -m (mner[\w.]*)", text))
    assert len(paths) > 20 and modules  # the patterns find what the docs name
    assert sorted(p for p in paths if not (ROOT / p).exists()) == []
    assert sorted(m for m in modules if importlib.util.find_spec(m) is None) == []


def script_options(script: Path) -> set[str] | None:
    """The ``--options`` a script's argparse parser declares (None: the script declares none)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            found |= {arg.value for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value)[:2] == "--"}
    return found or None


def script_commands() -> list[tuple[str, Path, list[str]]]:
    """``python bench/x.py --flag ...`` lines of the docs' shell blocks: (where, script, its words)."""
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for block in FENCE.finditer(text):
            if block.group(1).strip() not in SHELL_FENCES:
                continue
            words = shell_words(block.group(2))
            for i, word in enumerate(words[:-1]):
                if word == "python" and re.fullmatch(r"(bench|sample)/\w+\.py", words[i + 1]):
                    end = next((j for j in range(i + 2, len(words)) if words[j] in ENDS), len(words))
                    found.append((f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, block.start(2)) + 1}",
                                  ROOT / words[i + 1], words[i + 2:end]))
    return found


def test_documented_bench_and_sample_scripts_take_the_flags_given():
    commands = script_commands()
    assert len(commands) >= 10  # the docs run the bench scripts with flags
    assert {"--images", "--chunk-size"} <= script_options(ROOT / "bench" / "bench_extract.py")
    problems = []
    for where, script, words in commands:
        declared = script_options(script)
        unknown = [w.split("=")[0] for w in words if w.startswith("--") and declared is not None
                   and w.split("=")[0] not in declared | {"--help"}]
        if unknown:
            problems.append(f"{where}: {script.relative_to(ROOT)} has no {', '.join(unknown)}")
    assert not problems, "\n".join(problems)
