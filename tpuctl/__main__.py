from tpuctl.cli import entry

entry()
