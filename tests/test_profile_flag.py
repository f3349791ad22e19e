"""`--profile` is DeepSpeed's wall-clock breakdown, written once into the DeepSpeed JSON."""

import json

from craken_cli.app import main


def test_profile_flag_turns_on_wall_clock_breakdown(tmp_path, capsys):
    for flag, expected in (("--profile", True), ("--no-profile", False)):
        out = tmp_path / flag.strip("-")
        try:
            main(["config", "render", "--zero", "2", "--cpu", "--num-processes", "2", "--out", str(out), flag])
        except SystemExit as exc:
            assert exc.code in (0, None)
        ds = json.loads((out / "ds_config.json").read_text())
        assert ds["wall_clock_breakdown"] is expected
        assert "wall_clock_breakdown" not in (out / "accelerate.yaml").read_text()
