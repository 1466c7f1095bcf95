"""Fine-tuning from SimMIM, the reference's entry point: ``python main_simmim_ft.py --cfg FILE --pretrained CKPT``.

It is :mod:`main`: ``--pretrained`` takes a SimMIM pretraining checkpoint (its encoder, see
``checkpoint.load_pretrained``), and the fine-tuning configs set ``TRAIN.LAYER_DECAY``.
"""
import main
from utils import exit_process

if __name__ == "__main__":
    exit_process(main.cli())
