"""Change notifications for table files, without a system call per request.

Postfix's proxymap notices a changed table by asking the file (dict_db
compares its stat() with the one taken at open, before each request). We
ask the kernel to tell us instead: one inotify instance per worker watches
every table file an instance has open (IN_MODIFY, IN_ATTRIB, removal) and
its directory (a file replaced by rename, removed, created again). Each
watched path has a generation number, bumped by every notification about
it; a table instance remembers the generation it was opened at, so "has my
file changed?" is one integer comparison.

The worker drains the notifications once per event-loop batch, after it has
read the batch's requests and before it answers any of them: the kernel
queues a notification while the write system call runs, so a change
completed before a request was sent is always counted before that request
is answered. (A drain before the reads would not do: a read can return a
request sent after that drain.)

inotify sees only the changes made through this kernel. A file on a network
or cluster filesystem (NFS, CIFS, FUSE, ...) can change without a
notification, so such a path is not watched: `watch()` answers None and the
table keeps the stat() comparison (Table.changed, with its caution about
coarse file times). The same fallback serves when inotify is unavailable or
its watch limit (fs.inotify.max_user_watches) is reached; one warning says
so.
"""

from __future__ import annotations

import errno
import os
import select
import struct

from inotify_simple import INotify, flags as IN

from proxymap.conventions import maillog

#: on the table file itself
FILE_MASK = IN.MODIFY | IN.ATTRIB | IN.CLOSE_WRITE | IN.DELETE_SELF | IN.MOVE_SELF
#: on its directory, for the file's name: replaced, removed, created again
DIR_MASK = IN.CREATE | IN.MOVED_TO | IN.MOVED_FROM | IN.DELETE | IN.ONLYDIR

#: filesystem types where another machine (or a user-space server) can
#: change a file without this kernel noticing: inotify cannot be trusted there
REMOTE_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs",
    "lustre", "gfs2", "ocfs2", "gpfs", "beegfs", "vboxsf", "virtiofs", "fuse", "fuseblk",
})

MOUNTS = "/proc/self/mounts"

#: bytes asked of the inotify descriptor per read, and the largest event it
#: can return (struct inotify_event, 16 bytes, and a name of up to NAME_MAX
#: bytes with its NUL)
READ_SIZE = 65536
MAX_EVENT = 16 + 255 + 1
#: struct inotify_event's fixed part: wd, mask, cookie, len (of the name)
EVENT_HEADER = struct.Struct("iIII")

# the mask bits _note tests, as plain ints (an IntEnum member costs a
# lookup and an enum operation on every event)
_Q_OVERFLOW, _IGNORED = int(IN.Q_OVERFLOW), int(IN.IGNORED)
_CREATED = int(IN.CREATE | IN.MOVED_TO)


def inotify_sees_all_writes(fstype: str) -> bool:
    """Whether every change to a file on a filesystem of this type passes
    through the local kernel (and so raises an inotify event)."""
    return fstype not in REMOTE_FILESYSTEMS and not fstype.startswith("fuse.")


def _unescape_mount_field(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as octal escapes
    out, i = [], 0
    while i < len(field):
        digits = field[i + 1:i + 4]
        if field[i] == "\\" and len(digits) == 3 and digits.isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def filesystem_type(path: str, mounts_text: str) -> str:
    """The type of the filesystem holding absolute `path`, from the text of
    /proc/self/mounts (the longest mount point that contains it; the last
    mounted one when several share it). "" when none matches."""
    best, best_type = -1, ""
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape_mount_field(fields[1])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best:
            best, best_type = len(point), fields[2]
    return best_type


class Watch:
    """One watched path; `gen` counts the notifications about it."""

    __slots__ = ("path", "gen", "file_wd", "watcher")

    def __init__(self, path: str, watcher: "FileWatcher"):
        self.path = path
        self.gen = 0
        self.file_wd: int | None = None
        self.watcher = watcher

    def drain(self) -> None:
        """Count the notifications queued so far (for every path)."""
        self.watcher.drain()


class FileWatcher:
    """The inotify instance of one worker process and the paths it watches."""

    def __init__(self, mounts: str = MOUNTS):
        self._mounts = mounts
        self._watches: dict[str, Watch] = {}
        self._files: dict[int, set[Watch]] = {}        # file wd -> watches
        self._dirs: dict[int, dict[str, Watch]] = {}   # dir wd -> name -> watch
        self._dir_wds: dict[str, int] = {}
        self._warned = False
        try:
            self._inotify = INotify(nonblocking=True)
        except OSError as exc:
            self._inotify = None
            self._warn(f"inotify unavailable ({exc.strerror}): table files are checked"
                       " with stat() before every request")
        self.fd = None if self._inotify is None else self._inotify.fileno()
        # "anything queued?" without a failing read (an exception per loop
        # pass costs more than the system call): an epoll of its own
        self._queued = None
        if self.fd is not None:
            self._queued = select.epoll()
            self._queued.register(self.fd, select.EPOLLIN)

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            maillog.warning(message)

    def watch(self, path: str) -> tuple[Watch, bool] | None:
        """(watch, new) for `path` (absolute or not): the watch is added on
        first use and re-established when its file or directory had gone
        (new: the file was not watched until now, so a change just before
        went unseen). None when the path cannot be watched reliably (the
        caller uses stat)."""
        if self._inotify is None:
            return None
        path = os.path.abspath(path)
        directory, name = os.path.split(path)
        watch = self._watches.get(path)
        if watch is None:
            if not inotify_sees_all_writes(self._fstype(directory)):
                maillog.debug(f"{path}: on a network filesystem: checked with stat()")
                return None
            watch = Watch(path, self)
        try:
            dir_wd = self._dir_wds.get(directory)
            if dir_wd is None:
                dir_wd = self._inotify.add_watch(directory, DIR_MASK)
                self._dir_wds[directory] = dir_wd
            self._dirs.setdefault(dir_wd, {})[name] = watch
        except OSError as exc:
            self._watch_failed(path, exc)
            self._watches.pop(path, None)
            return None
        self._watches[path] = watch
        new = watch.file_wd is None
        if new and not self._add_file(watch):
            del self._watches[path]
            self._dirs[dir_wd].pop(name, None)
            return None
        return watch, new

    def _fstype(self, directory: str) -> str:
        try:
            with open(self._mounts, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            return ""
        return filesystem_type(os.path.realpath(directory), text)

    def _watch_failed(self, path: str, exc: OSError) -> None:
        if exc.errno == errno.ENOSPC:
            self._warn("inotify watch limit reached (fs.inotify.max_user_watches):"
                       " further table files are checked with stat() before every request")
        elif exc.errno != errno.ENOENT:
            maillog.warning(f"watch {path}: {exc.strerror}: checked with stat()")

    def _add_file(self, watch: Watch) -> bool:
        """(Re)watch the file now at watch.path; a missing file is watched
        again when its directory reports it created. False when an existing
        file cannot be watched."""
        try:
            wd = self._inotify.add_watch(watch.path, FILE_MASK)
        except OSError as exc:
            watch.file_wd = None
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return True
            self._watch_failed(watch.path, exc)
            return False
        watch.file_wd = wd
        self._files.setdefault(wd, set()).add(watch)
        return True

    def drain(self) -> int:
        """Count every queued notification into its paths' generations;
        returns the number of notifications read."""
        if self._inotify is None or not self._watches or not self._queued.poll(0):
            return 0
        total = 0
        while True:
            try:
                data = os.read(self.fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return total
            # struct inotify_event by struct inotify_event, without making
            # an object of each (inotify_simple.parse_events's namedtuples)
            unpack, note, pos, end = EVENT_HEADER.unpack_from, self._note, 0, len(data)
            while pos < end:
                wd, mask, _, size = unpack(data, pos)
                pos += 16 + size
                note(wd, mask, os.fsdecode(data[pos - size:pos].split(b"\0", 1)[0])
                     if size else "")
                total += 1
            if len(data) <= READ_SIZE - MAX_EVENT:
                # the kernel gives every queued event that fits: room for
                # one more was left, so the queue was empty (no second
                # read to learn it, which costs a system call and an
                # exception per drain)
                return total

    def _note(self, wd: int, mask: int, name: str) -> None:
        if mask & _Q_OVERFLOW:            # lost some: everything may have changed
            for watch in self._watches.values():
                watch.gen += 1
            return
        names = self._dirs.get(wd)
        if names is not None:
            watch = names.get(name)
            if watch is not None:
                watch.gen += 1
                if mask & _CREATED and not self._add_file(watch):
                    self._abandon(watch)    # a new file under the name, not watchable
            if mask & _IGNORED:              # the directory itself went away
                del self._dirs[wd]
                for path, dwd in list(self._dir_wds.items()):
                    if dwd == wd:
                        del self._dir_wds[path]
                for watch in names.values():
                    watch.gen += 1
            return
        watches = self._files.get(wd)
        if watches is None:
            return
        for watch in watches:
            watch.gen += 1
        if mask & _IGNORED:
            del self._files[wd]
            for watch in watches:
                if watch.file_wd == wd:
                    watch.file_wd = None

    def _abandon(self, watch: Watch) -> None:
        """A watch that can no longer see its file: it counts as changed
        for ever (NaN equals nothing), so its instances reopen and ask for
        a new watch, or fall back to stat()."""
        watch.gen = float("nan")
        self._watches.pop(watch.path, None)
        for names in self._dirs.values():
            if names.get(os.path.basename(watch.path)) is watch:
                del names[os.path.basename(watch.path)]

    def close(self) -> None:
        if self._inotify is not None:
            self._queued.close()
            self._inotify.close()
            self._inotify = None
