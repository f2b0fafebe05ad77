"""The extraction run: which images, decoded where, chunked, resumed, sharded and assembled into one cache."""
