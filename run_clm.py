"""Train and evaluate causal language models (LCKV ``opt-llama`` or plain ``llama``) with the HF Trainer.

Examples:
    python run_clm.py --use_embedded_corpus --config_name configs/llama_tiny_opt.json \\
        --output_dir outputs/tiny --do_train --do_eval --max_steps 200
    python run_clm.py --dataset_name wikitext --dataset_config_name wikitext-103-raw-v1 \\
        --tokenizer_name TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T --config_name configs/llama_tiny_opt.json \\
        --block_size 1024 --output_dir outputs/wt103 --do_train --do_eval

Run ``python run_clm.py --help`` for every flag. Bad input exits with a one-line error naming the flag.
"""

from tools.training import main

if __name__ == "__main__":
    main()
