"""An example scenario file for ``scripts/scenario.py run`` (copy it).

    .venv/bin/python scripts/scenario.py run scripts/lab_example.py --plot /tmp/lost-break.svg

``lost-break``: the fileserver drops the break it owes B (a nemesis).  The
server marks B down and keeps the break; its retry of down clients delivers
it while B stays idle, and B then reads A's data.
"""

from afsfuse.lab import Lab, scenario


@scenario("lost-break",
          "the break to B is lost (drop-breaks): B is marked down, gets the kept break "
          "later, and reads A's data", break_timeout=1)  # fmt: skip
def lost_break(lab: Lab) -> None:
    a, b = lab.mount("A"), lab.mount("B")
    a.write("notes.txt", b"draft")
    lab.require(b.read("notes.txt") == b"draft", "B reads the draft")
    fid = a.fid("notes.txt")
    lab.server.drop_breaks("B")
    lab.phase("A rewrites notes.txt; the break to B is dropped")
    a.write("notes.txt", b"final")
    lab.expect("server", "nemesis_effect", kind="drop-breaks", client="B")
    lab.expect("server", "client_down", client="B")
    # Nothing on B asks the server anything: the server's own retry of down
    # clients (every 2.5 break timeouts) delivers the kept break.
    lab.expect("server", "break", within=10, client="B", fid=fid, delayed="1")
    lab.expect("server", "client_up", client="B")
    lab.check(b.read("notes.txt") == b"final", "B reads the final version")
    lab.server.heal()
