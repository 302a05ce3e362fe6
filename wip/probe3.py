import sys
sys.argv = ["x"] + sys.argv[1:]
sys.path.insert(0, "/work/main/tests")
import test_patterns as tpat
src = open("/tmp/pk15/probe2.py").read()
src = src.replace("for cls in [tpat.Attention, tpat.Transposed]:\n        for meth in tpat.STRUCTURED:", "for cls in [tpat.Attention, tpat.FunctionalLinear, tpat.Shuffle]:\n        for meth in ['l1-norm', 'fpgm', 'dist-fit']:")
exec(compile(src, "probe2", "exec"))
