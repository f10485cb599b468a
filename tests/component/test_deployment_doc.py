"""docs/DEPLOYMENT.md against the repository: what can be checked without booting boards.

Shell commands are the lines of the doc's ```sh blocks (parsed by deployment_doc, which also knows
which of them tests/e2e/test_deployment_commands.py runs and where). Playbooks named there must exist and pass
`ansible-playbook --syntax-check` with the production example inventory; `make` targets must exist;
simulator subcommands and rkllm-* flags must be accepted by the real parsers; ad-hoc host patterns
must match the example inventory. Every variable the doc names (`-e`, YAML snippets, inline code)
must be declared in a role's meta/argument_specs.yml (or, for playbook-level knobs, in that
playbook). Every block follows the doc's convention for runnable blocks and stated outcomes.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest
import yaml
from component.deployment_doc import (
    NOT_RUN_MARKER,
    PLACE_MARKERS,
    REPO_ROOT,
    Place,
    blocks,
    doc_text,
    shell_blocks,
    shell_commands,
)

from rkllm_runtime.chat_templates import builtin_templates
from rkllm_runtime.config import ModelConfig

EXAMPLE_INVENTORY = "inventory/production.example"
BIN = Path(sys.executable).parent
COLLECTOR = "roles/monitoring/templates/rknpu-textfile-collector.sh.j2"
ROLE_PREFIXES = ("rknpu_driver", "rkllm_lib", "rkllm_models", "rkllm_server", "rkllm_convert",
                 "nginx_lb", "fleet_firewall", "monitoring", "balancer_vip", "fleet_bootstrap")
# Playbook-level knobs (not role variables), checked against the playbooks themselves.
PLAYBOOK_PREFIXES = ("rolling_update", "bench")
CONNECTION_VARS = {"ansible_host", "ansible_user", "ansible_port", "ansible_python_interpreter",
                   "ansible_ssh_private_key_file", "ansible_become"}
# Commands the doc may use that the test cannot check beyond existing: standard tools on the
# controller and on the boards.
PLAIN_TOOLS = {"awk", "bash", "cat", "cp", "curl", "dmesg", "echo", "export", "grep", "install",
               "journalctl", "nft", "openssl", "sha256sum", "ssh", "ssh-keygen", "systemctl",
               "systemd-analyze", "test", "uname", "ulimit", "."}
VAULT_SUBCOMMANDS = {"create", "decrypt", "edit", "encrypt", "encrypt_string", "rekey", "view"}
SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")
_PREFIX_ALTERNATIVES = "|".join(ROLE_PREFIXES + PLAYBOOK_PREFIXES)
IDENTIFIER = re.compile(rf"\b((?:{_PREFIX_ALTERNATIVES})_[a-z0-9_]+)\b")


class _VaultTolerantLoader(yaml.SafeLoader):
    """Reads `!vault |` values (ansible-vault encrypt_string output) as plain strings."""


_VaultTolerantLoader.add_constructor("!vault", lambda loader, node: loader.construct_scalar(node))


def split_commands(line: str) -> list[list[str]]:
    """A shell line -> simple commands (pipelines, lists and $(...) split apart; redirections,
    environment assignments and `ip netns exec NS` wrappers dropped)."""
    inner = [split_commands(m.group(1)) for m in SUBSTITUTION.finditer(line)]
    lexer = shlex.shlex(SUBSTITUTION.sub("SUBSTITUTED", line), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    tokens = iter(lexer)
    for token in tokens:
        if token in {"|", "||", "&&", ";"}:
            commands.append([])
        elif token in {">", ">>", "<"}:
            next(tokens)
        else:
            commands[-1].append(token)
    simple = []
    for words in commands:
        while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
            words = words[1:]
        if words[:3] == ["ip", "netns", "exec"]:
            words = words[4:]
        if words:
            simple.append(words)
    return simple + [command for nested in inner for command in nested]


@cache
def commands() -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(words) for command in shell_commands() for words in split_commands(command.text))


def commands_of(program: str) -> list[tuple[str, ...]]:
    return [c for c in commands() if c[0] == program]


def option_values(words: tuple[str, ...], *names: str) -> list[str]:
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word in names]


def syntax_check_argv() -> tuple[str, ...]:
    return (str(BIN / "ansible-playbook"), "--syntax-check", "-i", EXAMPLE_INVENTORY, *playbooks_named())


def adhoc_argvs() -> dict[str, tuple[str, ...]]:
    return {words[1]: (str(BIN / "ansible"), words[1], "-i", EXAMPLE_INVENTORY, "--list-hosts")
            for words in commands_of("ansible")}


def inventory_argvs() -> list[tuple[str, ...]]:
    return [(str(BIN / "ansible-inventory"),
             *(EXAMPLE_INVENTORY if w == "inventory/production" else w for w in words[1:]))
            for words in commands_of("ansible-inventory")]


def simulator_commands() -> list[tuple[str, ...]]:
    return commands_of("python3")


def simulator_help_argv(words: tuple[str, ...]) -> tuple[str, ...]:
    return (sys.executable, *words[1:], "--help")


def make_argv(target: str) -> tuple[str, ...]:
    return ("make", "-n", target)


@cache
def external_results() -> dict[tuple[str, ...], subprocess.CompletedProcess[str]]:
    """Every external command the tests need, run once and concurrently (each takes ~1 s)."""
    argvs = sorted({syntax_check_argv(), *adhoc_argvs().values(), *inventory_argvs(),
                    *map(simulator_help_argv, simulator_commands()), *map(make_argv, make_targets())})

    def run(argv: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
                              check=False)

    with ThreadPoolExecutor(max_workers=len(argvs)) as pool:
        return dict(zip(argvs, pool.map(run, argvs), strict=True))


@cache
def declared_variables() -> frozenset[str]:
    names: set[str] = set()
    for spec_file in REPO_ROOT.glob("roles/*/meta/argument_specs.yml"):
        specs = yaml.safe_load(spec_file.read_text(encoding="utf-8"))["argument_specs"]
        for entry_point in specs.values():
            names.update((entry_point.get("options") or {}).keys())
    return frozenset(names)


@cache
def playbook_texts() -> str:
    paths = [REPO_ROOT / "site.yml", *sorted((REPO_ROOT / "ansible").rglob("*.yml"))]
    return "\n".join(path.read_text(encoding="utf-8") for path in paths)


def is_declared(name: str) -> bool:
    """A role variable with an argument spec, or a variable a playbook itself reads."""
    return name in declared_variables() or re.search(rf"\b{name}\b", playbook_texts()) is not None


def yaml_documents() -> list[object]:
    return [yaml.load(block.text, Loader=_VaultTolerantLoader)
            for block in blocks() if block.language == "yaml"]


def inventory_variables(document: object) -> dict[str, object]:
    """Variables set by a YAML snippet: a group_vars/host_vars file, or a hosts.yml tree under `all`."""
    if not isinstance(document, dict):
        return {}
    if "all" not in document:
        return dict(document)
    found: dict[str, object] = {}

    def walk(group: dict[str, object]) -> None:
        found.update(group.get("vars") or {})
        for host_vars in (group.get("hosts") or {}).values():
            found.update(host_vars or {})
        for child in (group.get("children") or {}).values():
            walk(child or {})

    walk(document["all"])
    return found


def doc_variables() -> dict[str, object]:
    merged: dict[str, object] = {}
    for document in yaml_documents():
        merged.update(inventory_variables(document))
    return merged


def example_inventory_variables() -> set[str]:
    names: set[str] = set()
    for path in (REPO_ROOT / EXAMPLE_INVENTORY).rglob("*.yml"):
        names.update(inventory_variables(yaml.safe_load(path.read_text(encoding="utf-8"))))
    return names


def help_flags(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text))


def flags(words: tuple[str, ...]) -> set[str]:
    return {word.split("=", 1)[0] for word in words if word.startswith("--")}


# -- the doc's own structure ---------------------------------------------------------------------

def test_doc_has_the_sections_an_operator_needs() -> None:
    headings = re.findall(r"^#{2,3} (.+)$", doc_text(), re.MULTILINE)
    for topic in ["rknpu 0.9.8", "inventory", "Vault", "Network layout", "firewall", "TLS and API keys",
                  "Adding a board", "Adding a model", "Rolling updates", "Monitoring", "Troubleshooting",
                  "Old rknpu driver", "Too many open files", "NPU memory domains",
                  "Toolkit/runtime version mismatch", "Slow boards", "Security"]:
        assert any(topic.lower() in heading.lower() for heading in headings), topic


def test_contents_links_point_at_headings() -> None:
    slugs = {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
             for heading in re.findall(r"^#{2,3} (.+)$", doc_text(), re.MULTILINE)}
    anchors = re.findall(r"\]\(#([^)]+)\)", doc_text())
    assert anchors
    assert sorted(set(anchors) - slugs) == []


def test_network_diagram_names_the_hosts_and_ports() -> None:
    diagram = next(b.text for b in blocks() if b.language == "text" and "balancer" in b.text)
    for needle in ["controller", "balancer", "rock5b-01", "client networks", "admin network", "monitor",
                   "8080", "443", "SSH 22", "9100"]:
        assert needle in diagram, needle


def test_every_shell_command_is_a_known_program() -> None:
    checked = {"ansible-playbook", "ansible", "ansible-inventory", "ansible-vault", "make", "python3",
               "rkllm-server", "rkllm-chat", "rkllm-bench"}
    unknown = sorted({c[0] for c in commands()} - checked - PLAIN_TOOLS)
    assert unknown == [], f"add a check for these commands or list them in PLAIN_TOOLS: {unknown}"
    assert len(commands()) > 30


def test_shell_blocks_follow_the_run_convention() -> None:
    placed = shell_blocks()
    places = {block.place for block in placed}
    assert {Place.CONTROLLER, Place.BOARD, Place.CLIENT, Place.NOT_RUN} <= places
    runnable = [block for block in placed if block.runnable]
    assert len(runnable) > len(placed) // 2, "most commands of the guide should run on the simulator"
    assert any(command.fails for block in runnable for command in block.commands)
    assert any(command.prints for block in runnable for command in block.commands)


def test_doc_states_its_run_convention() -> None:
    convention = re.search(r"<!--(.*?)-->", doc_text(), re.DOTALL)
    assert convention is not None and doc_text().index("<!--") < doc_text().index("\n## ")
    for marker in [*PLACE_MARKERS, "# prints:", "# fails:", "test_deployment_commands.py"]:
        assert marker in convention.group(1), marker
    assert NOT_RUN_MARKER in convention.group(1)


# -- Ansible -------------------------------------------------------------------------------------

def playbooks_named() -> list[str]:
    names = []
    for words in commands_of("ansible-playbook"):
        skip_next = False
        for word in words[1:]:
            if skip_next:
                skip_next = False
            elif word in {"-i", "-e", "--extra-vars", "--limit", "-l", "--tags", "-t", "-c", "--connection"}:
                skip_next = True
            elif not word.startswith("-"):
                names.append(word)
    return sorted(set(names))


def test_playbooks_exist_and_pass_syntax_check() -> None:
    playbooks = playbooks_named()
    assert {"site.yml", "ansible/balancer.yml", "ansible/rolling_update.yml",
            "ansible/monitoring.yml"} <= set(playbooks)
    missing = [p for p in playbooks if not (REPO_ROOT / p).is_file()]
    assert missing == []
    result = external_results()[syntax_check_argv()]
    assert result.returncode == 0, result.stdout + result.stderr


def test_inventories_named_are_the_example_copy_or_the_simulator() -> None:
    inventories = {value for words in commands() if words[0].startswith("ansible")
                   for value in option_values(words, "-i")}
    assert inventories <= {"inventory/production", "inventory/sim"}, inventories
    copy = next(c for c in commands_of("cp") if EXAMPLE_INVENTORY in c)
    assert copy[-1] == "inventory/production"


def test_extra_vars_are_declared() -> None:
    names = [value.split("=", 1)[0] for words in commands_of("ansible-playbook")
             for value in option_values(words, "-e", "--extra-vars")]
    assert names
    assert [n for n in names if not is_declared(n)] == []


def test_adhoc_patterns_match_the_example_inventory() -> None:
    patterns = adhoc_argvs()
    assert patterns
    for pattern, argv in sorted(patterns.items()):
        result = external_results()[argv]
        assert result.returncode == 0 and "hosts (0)" not in result.stdout, (pattern, result.stdout)
        assert "[WARNING]: Could not match" not in result.stderr, result.stderr


def test_ansible_inventory_commands_work_on_the_example() -> None:
    argvs = inventory_argvs()
    assert argvs
    for argv in argvs:
        result = external_results()[argv]
        assert result.returncode == 0, result.stderr
        assert "rkllm_boards" in result.stdout


def test_vault_commands_are_real_and_their_secrets_are_used() -> None:
    variables = doc_variables()
    referenced = " ".join(str(value) for value in variables.values())
    for words in commands_of("ansible-vault"):
        assert words[1] in VAULT_SUBCOMMANDS, words
        for name in option_values(words, "--name"):
            assert name.startswith("vault_") and name in variables, name
            assert re.search(rf"\{{\{{\s*{name}\s*\}}\}}", referenced), f"{name} is never used"


def test_snippet_variables_are_declared() -> None:
    names = set(doc_variables()) - CONNECTION_VARS
    secrets = {n for n in names if n.startswith("vault_")}
    assert [n for n in sorted(names - secrets) if not is_declared(n)] == []


def test_secrets_referenced_are_defined_somewhere() -> None:
    defined = set(doc_variables()) | example_inventory_variables()
    used = set(re.findall(r"\{\{\s*(vault_\w+)\s*\}\}", doc_text()))
    assert used
    assert sorted(used - defined) == []


def test_variables_in_inline_code_are_declared() -> None:
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", doc_text(), flags=re.MULTILINE | re.DOTALL))
    names = {name for span in spans for name in IDENTIFIER.findall(span)}
    # The NPU collector's metric names share the rknpu_driver prefix.
    metrics = set(re.findall(r"\b(rknpu_\w+)", (REPO_ROOT / COLLECTOR).read_text(encoding="utf-8")))
    assert len(names) > 40
    assert sorted(n for n in names if not is_declared(n) and n not in metrics) == []


def test_catalog_snippet_entries_are_complete() -> None:
    required = yaml.safe_load((REPO_ROOT / "roles/rkllm_models/vars/main.yml").read_text())[
        "_rkllm_models_required_keys"]
    catalogs = [doc["rkllm_models_catalog"] for doc in yaml_documents()
                if isinstance(doc, dict) and "rkllm_models_catalog" in doc]
    assert catalogs
    for entry in (e for catalog in catalogs for e in catalog):
        assert set(required) <= set(entry), entry["name"]
        assert entry["kind"] in {"quick", "reasoning"}
        # Presets name built-in templates; custom ones would need rkllm_server_templates as well.
        assert entry.get("template", "chatml") in builtin_templates(), entry["name"]


def test_server_model_settings_are_server_config_keys() -> None:
    keys = {key for doc in yaml_documents() if isinstance(doc, dict)
            for settings in (doc.get("rkllm_server_model_settings") or {}).values() for key in settings}
    assert keys
    assert sorted(keys - set(ModelConfig.model_fields)) == []


# -- make, the simulator and the rkllm-* commands ------------------------------------------------

def make_targets() -> set[str]:
    targets = {w for words in commands_of("make") for w in words[1:]
               if "=" not in w and not w.startswith("-")}
    inline = re.findall(r"`make ([a-z][\w-]*)", doc_text())
    return targets | set(inline)


def test_make_targets_exist() -> None:
    targets = make_targets()
    assert {"venv", "double"} <= targets
    for target in sorted(targets):
        result = external_results()[make_argv(target)]
        assert result.returncode == 0, f"make {target}: {result.stderr}"


def test_simulator_commands_parse() -> None:
    sim = simulator_commands()
    assert all(words[1:3] == ("-m", "tests.fleet.sim") for words in sim), sim
    assert {"up", "status", "down"} <= {w for words in sim for w in words[3:] if not w.startswith("-")}
    for words in sim:
        result = external_results()[simulator_help_argv(words)]
        assert result.returncode == 0, (words, result.stderr)
        assert flags(words) <= help_flags(result.stdout), words


@cache
def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def help_of(program: str, args: tuple[str, ...]) -> str:
    """Run the console script's entry point in-process with args + --help; returns the help text."""
    module_name, function_name = console_scripts()[program].split(":")
    entry_point = getattr(importlib.import_module(module_name), function_name)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        entry_point([*args, "--help"])
    assert exit_.value.code == 0, err.getvalue()
    return out.getvalue()


@pytest.mark.parametrize("program", ["rkllm-server", "rkllm-chat", "rkllm-bench"])
def test_rkllm_command_flags_exist(program: str) -> None:
    mentioned = commands_of(program) + [
        tuple(shlex.split(m)) for m in re.findall(rf"`({program} [^`]*)`", doc_text())]
    for words in mentioned:
        assert flags(words) <= help_flags(help_of(program, words[1:])), words
    if program != "rkllm-server":
        assert mentioned, f"the doc shows no {program} command"


