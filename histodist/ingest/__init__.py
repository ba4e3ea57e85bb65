"""Write side: raw datasets -> shards (driven by `python -m histodist.shard`).

sources/    one module per raw layout (folder, csv, PCam, IDC, BreakHis, HAM10000, ...)
writer.py   write one tar shard in a worker process; check shards against their records
imageio.py  decode, check, convert and encode one image for a shard
download.py download the official PatchCamelyon release (resumable, MD5-checked)
"""
