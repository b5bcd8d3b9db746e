"""Print the command RULER's prepare.py (c3f5e3b, lines 78-140) would run for one task: same template composition
(model template 'base' + answer prefix) and arguments. Run separately so only one python process runs at a time."""
import sys, yaml, importlib, os
sys.path.insert(0, "scripts/data")
task, length, tok, save = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
from template import Templates
module = importlib.import_module("synthetic.constants")
config = yaml.safe_load(open("scripts/synthetic.yaml"))[task]
config.update(module.TASKS[config["task"]])
config["template"] = Templates["base"].format(task_template=config["template"]) + config.get("answer_prefix", "")
script = os.path.join("scripts/data/synthetic", f"{config['task']}.py")
extra = " ".join(f"--{k} {v}" for k, v in config["args"].items())
print(f"""python {script} --save_dir {save} --save_name {task} --subset validation --tokenizer_path {tok} \
--tokenizer_type hf --max_seq_length {length} --tokens_to_generate {config['tokens_to_generate']} --num_samples 1 \
--random_seed 42 {extra} {"--pre_samples 0" if config['task'] == 'qa' else ""} --template "{config['template']}" """)
