import json, sys
main, new = sys.argv[1], sys.argv[2]
rows = [json.loads(x) for x in open(main).read().splitlines()]
fresh = {r["model"]: r for r in map(json.loads, open(new).read().splitlines())}
out = [fresh.pop(r["model"], r) for r in rows] + list(fresh.values())
open(main, "w").write("".join(json.dumps(r) + "\n" for r in out))
print("replaced", len(rows) + 0, "rows total", len(out))
