"""Method names on the wire (mirroring AFS RPC names; see SPEC.md)."""

# Client -> fileserver
FS_HELLO = "FS.Hello"
FS_FETCH_STATUS = "FS.FetchStatus"
FS_FETCH_DATA = "FS.FetchData"
FS_STORE_DATA = "FS.StoreData"
FS_STORE_STATUS = "FS.StoreStatus"
FS_CREATE_FILE = "FS.CreateFile"
FS_MAKE_DIR = "FS.MakeDir"
FS_SYMLINK = "FS.Symlink"
FS_LINK = "FS.Link"
FS_REMOVE_FILE = "FS.RemoveFile"
FS_REMOVE_DIR = "FS.RemoveDir"
FS_RENAME = "FS.Rename"
FS_LOOKUP = "FS.Lookup"
FS_READ_DIR = "FS.ReadDir"
FS_INLINE_BULK_STATUS = "FS.InlineBulkStatus"
FS_GET_VOLUME_STATUS = "FS.GetVolumeStatus"
FS_GIVE_UP_ALL_CALLBACKS = "FS.GiveUpAllCallBacks"
FS_GET_CAPABILITIES = "FS.GetCapabilities"
# Special files (SPEC "Special files") and user extended attributes (SPEC "Extended attributes")
FS_MAKE_NODE = "FS.MakeNode"
FS_FETCH_XATTRS = "FS.FetchXattrs"
FS_SET_XATTR = "FS.SetXattr"
FS_REMOVE_XATTR = "FS.RemoveXattr"
# Whole-file advisory locks (SPEC "Locks")
FS_SET_LOCK = "FS.SetLock"
FS_EXTEND_LOCK = "FS.ExtendLock"
FS_RELEASE_LOCK = "FS.ReleaseLock"

# Fileserver -> client, on the connection the client opened
CB_CALLBACK = "CB.CallBack"
CB_INIT_CALLBACK_STATE3 = "CB.InitCallBackState3"
CB_PROBE = "CB.Probe"
CB_PROBE_UUID = "CB.ProbeUuid"

# Volume location
VL_GET_ENTRY_BY_NAME = "VL.GetEntryByName"
VL_GET_ENTRY_BY_ID = "VL.GetEntryById"
VL_LIST_ENTRIES = "VL.ListEntries"
VL_REGISTER_SERVER = "VL.RegisterServer"
