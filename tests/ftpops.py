"""The file operations beyond LIST, RETR and STOR, for every client of
tests/ftpclients.py, each in the client's own way and data mode:

==========  =====================  =========================  ==========================
client      MKD                    RNFR/RNTO, DELE            REST (resumed RETR)
==========  =====================  =========================  ==========================
curl        ``-Q "MKD d" -I``      ``-Q "RNFR a" -Q "RNTO b"``, ``-C -`` (continue ``dest``)
                                   ``-Q "DELE b"``
lftp        ``mkdir``              ``mv``, ``rm``             ``get -c``
ftplib      ``mkd``                ``rename``, ``delete``     ``retrbinary(rest=…)``
tnftp       ``mkdir``              ``rename``, ``delete``     ``reget``
wget        —                      —                          ``-c`` (continue ``dest``)
rclone      ``mkdir``              ``moveto``, ``deletefile`` ``cat --offset`` (appended)
==========  =====================  =========================  ==========================

wget can neither upload nor change anything on a server: only ``resume``.
``CAN`` names what each client has. Every operation raises ``AssertionError``
(a non-zero exit, a missing reply) when it fails; the caller checks the effect
on the server's files.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from tests.ftpclients import (
    CLIENTS,
    Curl,
    FtpClient,
    Ftplib,
    Lftp,
    Login,
    Rclone,
    Tnftp,
    Wget,
    ftp_url,
    run_tool,
)

#: The operations each client has, by client name.
CAN: dict[str, frozenset[str]] = {
    name: frozenset({"mkdir", "rename", "delete", "resume"}) for name in CLIENTS
}
CAN["wget"] = frozenset({"resume"})


def _curl_quote(client: Curl, login: Login, mode: str, *commands: str) -> None:
    """Commands on the control connection only (``-I`` on the root: no transfer)."""
    argv = client._argv(login, mode)
    for command in commands:
        argv += ["--quote", command]
    run_tool([*argv, "--head", ftp_url(login)], secret=login.password)


def _tnftp(client: Tnftp, login: Login, mode: str, commands: list[str], codes: list[str]) -> str:
    """Run ``commands`` in one verbose tnftp session; every reply code in ``codes`` must
    appear (tnftp exits 0 whatever the commands did)."""
    script = "\n".join([*commands, "quit", ""]).encode()
    done = run_tool([*client._argv(mode), "-v", ftp_url(login, credentials=True)],
                    stdin=script, secret=quote(login.password, safe=""))
    out = done.stdout.decode("utf-8", "replace")
    finals = [line[:3] for line in out.splitlines() if line[:3].isdigit() and line[3:4] == " "]
    missing = [code for code in codes if code not in finals]
    assert not missing, f"tnftp {commands}: no {missing} reply:\n{out}"
    return out


def mkdir(client: FtpClient, login: Login, name: str, mode: str) -> None:
    """MKD ``name`` in the login directory."""
    if isinstance(client, Curl):
        _curl_quote(client, login, mode, f"MKD {name}")
    elif isinstance(client, Lftp):
        client._run(login, mode, f'mkdir "{name}"')
    elif isinstance(client, Ftplib):
        with client.session(login, mode) as ftp:
            ftp.mkd(name)
    elif isinstance(client, Tnftp):
        _tnftp(client, login, mode, [f"mkdir {name}"], ["257"])
    elif isinstance(client, Rclone):
        client._run(login, mode, "mkdir", client.remote(login, name))
    else:
        raise NotImplementedError(f"{client.name} cannot MKD")


def rename(client: FtpClient, login: Login, old: str, new: str, mode: str) -> None:
    """RNFR ``old``, RNTO ``new``."""
    if isinstance(client, Curl):
        _curl_quote(client, login, mode, f"RNFR {old}", f"RNTO {new}")
    elif isinstance(client, Lftp):
        client._run(login, mode, f'mv "{old}" "{new}"')
    elif isinstance(client, Ftplib):
        with client.session(login, mode) as ftp:
            ftp.rename(old, new)
    elif isinstance(client, Tnftp):
        _tnftp(client, login, mode, [f"rename {old} {new}"], ["350", "250"])
    elif isinstance(client, Rclone):
        client._run(login, mode, "moveto", client.remote(login, old), client.remote(login, new))
    else:
        raise NotImplementedError(f"{client.name} cannot rename")


def delete(client: FtpClient, login: Login, name: str, mode: str) -> None:
    """DELE ``name``."""
    if isinstance(client, Curl):
        _curl_quote(client, login, mode, f"DELE {name}")
    elif isinstance(client, Lftp):
        client._run(login, mode, f'rm "{name}"')
    elif isinstance(client, Ftplib):
        with client.session(login, mode) as ftp:
            ftp.delete(name)
    elif isinstance(client, Tnftp):
        _tnftp(client, login, mode, [f"delete {name}"], ["250"])
    elif isinstance(client, Rclone):
        client._run(login, mode, "deletefile", client.remote(login, name))
    else:
        raise NotImplementedError(f"{client.name} cannot DELE")


def resume(client: FtpClient, login: Login, name: str, dest: Path, mode: str) -> None:
    """Complete ``dest``, which holds the first bytes of ``name``: REST ``len(dest)``,
    then RETR of the rest, appended."""
    offset = dest.stat().st_size
    if isinstance(client, Curl):
        run_tool([*client._argv(login, mode), "--continue-at", "-", "--output", str(dest),
                  ftp_url(login, name)], secret=login.password)
    elif isinstance(client, Lftp):
        client._run(login, mode, f'get -c "{name}" -o "{dest}"')
    elif isinstance(client, Ftplib):
        with client.session(login, mode) as ftp, dest.open("ab") as f:
            ftp.retrbinary(f"RETR {name}", f.write, rest=offset)
    elif isinstance(client, Tnftp):
        _tnftp(client, login, mode, [f"reget {name} {dest}"], ["350", "226"])
    elif isinstance(client, Wget):
        # wget continues a file of the remote's name in its working directory
        assert dest.name == name, "wget resumes a file of the same name"
        run_tool([*client._argv(login, mode), "--continue", ftp_url(login, name)],
                 cwd=dest.parent, secret=login.password)
    elif isinstance(client, Rclone):
        rest = client._run(login, mode, "cat", "--offset", str(offset), client.remote(login, name))
        with dest.open("ab") as f:
            f.write(rest.stdout)
    else:
        raise NotImplementedError(f"{client.name} cannot resume")
