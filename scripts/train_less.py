"""Train LESS kernels for one model, base policy and budget (the recipe and the options: kvbench/training/less.py).

    python scripts/train_less.py --model smollm2_135m --base h2o --budget 0.1   # scaled CPU run (defaults)
    python scripts/train_less.py --model llama2_7b_chat --windows 512 --window-tokens 4096 --epochs 40 \
        --hidden 512 --device cuda                                               # the paper's schedule
    python scripts/train_less.py --evaluate KERNELS --window-tokens 4096          # held-out MSE of saved kernels
"""

from kvbench.training.less import main

if __name__ == "__main__":
    main()
