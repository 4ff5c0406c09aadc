"""README.md stays true: its two commands, the CI script that runs its test command, its scripts."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", README, re.S).group(1)
    lines = [l.split("#")[0].strip() for l in block.strip().splitlines()]
    assert lines[0] == "pip install -r requirements.txt && bash scripts/demo.sh"
    assert lines[1] == "pip install -r requirements.txt && python -m pytest"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [l.strip() for l in ci if l.strip() and not l.strip().startswith("#")]
    assert "python -m pip install -r requirements.txt" in commands
    assert commands[-1] == "python -m pytest"


def test_every_script_the_readme_names_exists():
    for path in set(re.findall(r"(?<![\w/.-])((?:scripts|tokenizer|autoregressive|evaluations|bench)/[\w/]+\.(?:sh|py))", README)):
        assert (ROOT / path).is_file(), path
