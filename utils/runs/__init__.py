"""Run infrastructure shared by the runners: results files and the rules for resuming them (records.py), flags
and one-line errors (cli.py), torchrun sharding (sharding.py) and greedy generation (generation.py).

This face hands on records.py's names (`from utils.runs import read_jsonl, append_jsonl, ...`); it imports neither
torch nor the engine, so eval_longbench.py and visualize_needle_in_haystack.py load without torch.
"""

from utils.runs.records import (append_csv, append_jsonl, check_same_settings, config_dict, locked, read_csv_rows,
                                read_jsonl, repair_jsonl, run_name, same_config, write_atomic)

__all__ = ["append_csv", "append_jsonl", "check_same_settings", "config_dict", "locked", "read_csv_rows",
           "read_jsonl", "repair_jsonl", "run_name", "same_config", "write_atomic"]
