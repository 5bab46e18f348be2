"""The MDS schema of every shard the project writes (converter, synthetic data) and reads (loader).

``image``: the stored bytes; ``format`` their format (jpeg | png | webp); ``rotate`` degrees
counter-clockwise applied at load; ``dataset`` the mixture's dataset name; ``index`` the sample's
index within its dataset. Shards of earlier versions hold ``jpeg`` instead of the first three.
"""

MDS_COLUMNS = {"image": "bytes", "format": "str", "rotate": "int", "dataset": "str", "index": "int"}
MDS_HASHES = ["sha1", "xxh64"]
