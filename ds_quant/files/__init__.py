"""Files: everything ds_quant reads or writes on disk (measurements, shards, safetensors, checkpoint folders, Hessians, tensor dumps, workbooks, HQT imports), written atomically."""
