"""`actorbroker scenario run FILE... [--junit out.xml]` and `actorbroker scenario list`.

A scenario (docs/scenarios.md) is a TOML file of ordered steps run against a real broker, each
client in its own OS process (scripts/scenario/agent.py). The library ships in scripts/scenarios/."""
import sys
import time
import xml.etree.ElementTree as ET


def add_scenario_command(subparsers):
    p = subparsers.add_parser("scenario", help="run scripted scenarios against a real broker",
                              description="Run scenario files (docs/scenarios.md): a broker, client "
                                          "processes and ordered steps with expectations.")
    sub = p.add_subparsers(dest="scenario_command", metavar="SUBCOMMAND")
    run = sub.add_parser("run", help="run scenario files (or names from the library)")
    run.add_argument("files", nargs="+", metavar="FILE",
                     help="a scenario file, or the name of a library scenario (see `scenario list`)")
    run.add_argument("--junit", metavar="OUT.xml", help="also write the results as JUnit XML")
    run.add_argument("--keep", action="store_true", help="keep the work directory (broker data, logs)")
    run.set_defaults(func=run_command)
    ls = sub.add_parser("list", help="list the scenarios shipped with actorbroker")
    ls.set_defaults(func=list_command)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def list_command(args):
    from actorbroker.scripts.scenario.format import ScenarioError, library, load
    for path in library():
        try:
            sc = load(path)
            slow = " [slow]" if sc.slow else ""
            text = " ".join(sc.description.split())
            text = text if len(text) <= 100 else text[:99] + "…"
            print(f"{path.stem:32} {text}{slow}")
        except ScenarioError as exc:
            print(f"{path.stem:32} INVALID: {exc}")
    return 0


def run_command(args):
    from actorbroker.scripts.scenario.format import ScenarioError, load, resolve
    from actorbroker.scripts.scenario.runner import Runner
    scenarios, errors = [], []
    for name in args.files:
        path = resolve(name)
        try:
            scenarios.append(load(path))
        except ScenarioError as exc:
            errors.append((path, str(exc)))
            print(f"error: {exc}", file=sys.stderr)
    results = []
    t0 = time.monotonic()
    try:
        for sc in scenarios:
            runner = Runner(sc, keep=args.keep)
            runner.run()
            results.append(runner)
            print()
    except KeyboardInterrupt:
        print("interrupted; every process started was stopped", file=sys.stderr)
        return 130
    finally:
        if args.junit:
            write_junit(args.junit, results, errors)
    failed = [r for r in results if r.failure]
    skipped = [r for r in results if r.skipped and not r.failure]
    total = time.monotonic() - t0
    print(f"{len(results) - len(failed) - len(skipped)} passed, {len(failed)} failed, {len(skipped)} skipped, "
          f"{len(errors)} invalid in {total:.1f}s")
    for r in skipped:
        print(f"  SKIPPED {r.scenario.name}: {r.skipped}")
    for r in failed:
        number, message, _ = r.failure
        print(f"  FAILED {r.scenario.name} (step {number}): {message}")
    for path, message in errors:
        print(f"  INVALID {message}")
    return 1 if failed or errors else 0


def write_junit(path, runners, errors):
    suite = ET.Element("testsuite", name="actorbroker.scenarios", tests=str(len(runners) + len(errors)),
                       failures=str(sum(1 for r in runners if r.failure)), errors=str(len(errors)),
                       time=f"{sum(getattr(r, 'elapsed', 0) for r in runners):.3f}")
    for r in runners:
        case = ET.SubElement(suite, "testcase", classname="scenario", name=r.scenario.name,
                             file=str(r.scenario.path), time=f"{getattr(r, 'elapsed', 0):.3f}")
        if r.failure:
            number, message, detail = r.failure
            f = ET.SubElement(case, "failure", message=f"step {number}: {message}")
            f.text = detail
        elif r.skipped:
            ET.SubElement(case, "skipped", message=r.skipped)
        ET.SubElement(case, "system-out").text = "\n".join(r.log)
    for p, message in errors:
        case = ET.SubElement(suite, "testcase", classname="scenario", name=str(p), time="0")
        ET.SubElement(case, "error", message=message)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
