"""Run an unmodified DeepSpeed inference script with FP8 (or measurement) from ds_quant.

    deepspeed --num_gpus 2 launch/run.py --quant-config CFG your_script.py [its args...]
    mpirun -np 2 python launch/run.py --quant-config CFG your_script.py [its args...]

Same as `python -m ds_quant.run`; see ds_quant/run.py.
"""

import sys

from ds_quant.run import main

if __name__ == "__main__":
    sys.exit(main())
