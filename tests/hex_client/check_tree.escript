#!/usr/bin/env escript
%% -*- erlang -*-
%%
%% check_tree.escript DIR REPO_NAME PUBLIC_KEY_PEM_FILE
%%
%% Checks a static Hex v2 registry tree (as written by niso) with the Hex
%% client code that rebar3 3.19 vendors (hex_core 0.7.1, module prefix r3_hex_).
%% No protobuf decoding of our own: every registry file goes through
%% r3_hex_registry (decode_signed / verify / decode_names/2 / decode_versions/2 /
%% decode_package/3), and additionally through the real client entry points
%% r3_hex_repo:get_names/1, get_versions/1, get_package/2 and get_tarball/3
%% with an http adapter that serves files from DIR instead of HTTP.
%% Tarballs are checked with r3_hex_tarball:unpack(Bin, memory).
%%
%% Prints every package's releases and "ok N packages M releases"; exits 0.
%% On any failure prints precise messages to stderr and exits 1.
%%
%% The rebar3 escript is located with $REBAR3 if set, else `rebar3` on PATH.
-module(check_tree).
-mode(compile).
-export([main/1, request/5]).

-define(URL_PREFIX, "niso-check-tree:").

main([Dir, RepoName, PemFile]) ->
    try
        run(Dir, list_to_binary(RepoName), PemFile)
    catch
        throw:{fatal, Msg} ->
            err("~s", [Msg]),
            finish();
        Class:Reason:Stack ->
            err("internal error: ~p:~p~n  ~p", [Class, Reason, Stack]),
            halt(1)
    end;
main(_) ->
    io:format(standard_error,
              "usage: escript check_tree.escript DIR REPO_NAME PUBLIC_KEY_PEM_FILE~n", []),
    halt(2).

%%--------------------------------------------------------------------
%% main flow

run(Dir, Repo, PemFile) ->
    put(errors, 0),
    load_hex_core(),
    {ok, _} = application:ensure_all_started(crypto),
    {ok, _} = application:ensure_all_started(public_key),
    PubPem = read_public_key(PemFile),
    check_tree_public_key(Dir, PubPem, PemFile),
    Config = maps:merge(r3_hex_core:default_config(),
                        #{repo_name => Repo,
                          repo_organization => undefined,
                          repo_url => list_to_binary(?URL_PREFIX),
                          repo_public_key => PubPem,
                          repo_verify => true,
                          repo_verify_origin => true,
                          http_adapter => {?MODULE, #{dir => Dir}}}),
    Names = check_signed_file(Dir, "names", names, Repo, undefined, PubPem,
                              fun() -> r3_hex_repo:get_names(Config) end),
    Versions = check_signed_file(Dir, "versions", versions, Repo, undefined, PubPem,
                                 fun() -> r3_hex_repo:get_versions(Config) end),
    NameList = [N || #{name := N} <- Names],
    io:format("names: ~b packages (repository ~s)~n", [length(NameList), Repo]),
    io:format("versions: ~b packages~n", [length(Versions)]),
    check_unique("names", NameList),
    VersionsByName = maps:from_list([{N, P} || P = #{name := N} <- Versions]),
    check_unique("versions", [N || #{name := N} <- Versions]),
    [err("versions lists package ~s which is not in names", [N])
     || N <- lists:sort(maps:keys(VersionsByName)) -- NameList],
    Counts = [check_package(Dir, Repo, PubPem, Config, Name,
                            maps:get(Name, VersionsByName, undefined))
              || Name <- NameList],
    Releases = lists:sum([R || {R, _} <- Counts]),
    Skipped = lists:sum([S || {_, S} <- Counts]),
    case get(errors) of
        0 ->
            Skipped > 0 andalso
                io:format("skipped ~b releases that are not hex tarballs~n", [Skipped]),
            io:format("ok ~b packages ~b releases~n", [length(NameList), Releases]),
            halt(0);
        _ ->
            finish()
    end.

finish() ->
    io:format(standard_error, "FAILED: ~b error(s)~n", [max(1, get(errors))]),
    halt(1).

err(Fmt, Args) ->
    io:format(standard_error, "error: " ++ Fmt ++ "~n", Args),
    put(errors, get(errors) + 1),
    error.

fatal(Fmt, Args) ->
    throw({fatal, io_lib:format(Fmt, Args)}).

%%--------------------------------------------------------------------
%% loading hex_core from the rebar3 escript

load_hex_core() ->
    Rebar3 = case os:getenv("REBAR3") of
                 false -> os:find_executable("rebar3");
                 "" -> os:find_executable("rebar3");
                 P -> P
             end,
    Rebar3 =:= false andalso
        fatal("rebar3 not found on PATH (set REBAR3=/path/to/rebar3); "
              "run scripts/install-test-deps", []),
    Sections = case escript:extract(Rebar3, []) of
                   {ok, S} -> S;
                   {error, E} -> fatal("cannot read rebar3 escript ~s: ~p", [Rebar3, E])
               end,
    Archive = case lists:keyfind(archive, 1, Sections) of
                  {archive, A} when is_binary(A) -> A;
                  _ -> fatal("~s is not an escript with a zip archive", [Rebar3])
              end,
    {ok, Files} = zip:extract(Archive, [memory]),
    Beams = [{list_to_atom(filename:basename(N, ".beam")), N, B}
             || {N, B} <- Files,
                filename:extension(N) =:= ".beam",
                hex_core_module(filename:basename(N, ".beam"))],
    Beams =:= [] andalso fatal("no r3_hex_* modules in ~s", [Rebar3]),
    [case code:load_binary(Mod, Rebar3 ++ "/" ++ N, B) of
         {module, Mod} -> ok;
         {error, R} -> fatal("cannot load ~s from ~s: ~p", [Mod, Rebar3, R])
     end || {Mod, N, B} <- Beams],
    [case code:is_loaded(M) of
         false -> fatal("module ~s missing from ~s", [M, Rebar3]);
         _ -> ok
     end || M <- [r3_hex_core, r3_hex_registry, r3_hex_repo, r3_hex_http,
                  r3_hex_tarball, r3_hex_erl_tar, r3_hex_pb_signed,
                  r3_hex_pb_names, r3_hex_pb_versions, r3_hex_pb_package,
                  r3_safe_erl_term]],
    ok.

%%--------------------------------------------------------------------
%% hex_core proper plus the safe term parser r3_hex_tarball uses for metadata.config
hex_core_module(Mod) ->
    lists:prefix("r3_hex_", Mod) orelse Mod =:= "r3_safe_erl_term".

%%--------------------------------------------------------------------
%% http adapter for r3_hex_http: serves DIR/PATH for URL "niso-check-tree:/PATH"

request(get, URI, _ReqHeaders, _Body, #{dir := Dir}) ->
    Path = case lists:prefix(?URL_PREFIX "/", binary_to_list(URI)) of
               true -> lists:nthtail(length(?URL_PREFIX "/"), binary_to_list(URI));
               false -> error({unexpected_uri, URI})
           end,
    case file:read_file(filename:join(Dir, Path)) of
        {ok, Bin} -> {ok, {200, #{}, Bin}};
        {error, enoent} -> {ok, {404, #{}, <<"not found">>}};
        {error, R} -> {error, R}
    end;
request(Method, URI, _, _, _) ->
    {error, {unexpected_request, Method, URI}}.

%%--------------------------------------------------------------------
%% public key

read_public_key(PemFile) ->
    Pem = case file:read_file(PemFile) of
              {ok, B} -> B;
              {error, R} -> fatal("cannot read public key ~s: ~s", [PemFile, file:format_error(R)])
          end,
    case catch public_key:pem_decode(Pem) of
        [Entry | _] ->
            case catch public_key:pem_entry_decode(Entry) of
                Key when element(1, Key) =:= 'RSAPublicKey' -> Pem;
                Other -> fatal("~s: not an RSA public key: ~P", [PemFile, Other, 8])
            end;
        Other ->
            fatal("~s: no PEM entry: ~P", [PemFile, Other, 8])
    end.

decode_key(Pem) ->
    [Entry | _] = public_key:pem_decode(Pem),
    public_key:pem_entry_decode(Entry).

check_tree_public_key(Dir, PubPem, PemFile) ->
    F = filename:join(Dir, "public_key"),
    case file:read_file(F) of
        {ok, TreePem} ->
            case catch decode_key(TreePem) of
                K when element(1, K) =:= 'RSAPublicKey' ->
                    case K =:= decode_key(PubPem) of
                        true -> io:format("public_key: matches ~s~n", [PemFile]);
                        false -> err("~s is a different key from ~s", [F, PemFile])
                    end;
                _ ->
                    err("~s is not a PEM RSA public key", [F])
            end;
        {error, enoent} ->
            err("~s is missing", [F]);
        {error, R} ->
            err("cannot read ~s: ~s", [F, file:format_error(R)])
    end.

%%--------------------------------------------------------------------
%% signed registry files: names, versions, packages/NAME

%% Returns the decoded list (packages for names/versions, releases for a package),
%% or throws {fatal, Msg} when the file cannot be used at all.
check_signed_file(Dir, RelPath, Kind, Repo, PkgName, PubPem, ClientFun) ->
    File = filename:join(Dir, RelPath),
    Gz = case file:read_file(File) of
             {ok, B} -> B;
             {error, R} -> fatal("cannot read ~s: ~s", [File, file:format_error(R)])
         end,
    Signed = case catch zlib:gunzip(Gz) of
                 S when is_binary(S) -> S;
                 _ -> fatal("~s: not gzip data", [File])
             end,
    SignedMap = case catch r3_hex_registry:decode_signed(Signed) of
                    M when is_map(M) -> M;
                    E -> fatal("~s: not a Signed protobuf: ~P", [File, E, 10])
                end,
    Payload = case SignedMap of
                  #{payload := P} when is_binary(P) -> P;
                  _ -> fatal("~s: Signed.payload (field 1) missing", [File])
              end,
    case SignedMap of
        #{signature := Sig} when is_binary(Sig), Sig =/= <<>> ->
            case catch r3_hex_registry:verify(Payload, Sig, PubPem) of
                true -> ok;
                false -> fatal("~s: signature does not verify with the public key "
                               "(RSA PKCS#1 v1.5, SHA-512 over Signed.payload)", [File]);
                E2 -> fatal("~s: signature verification error: ~P", [File, E2, 10])
            end;
        _ ->
            fatal("~s: Signed.signature (field 2) missing or empty", [File])
    end,
    %% same call the client makes after gunzip (r3_hex_repo:decode/4)
    case catch r3_hex_registry:decode_and_verify_signed(Signed, PubPem) of
        {ok, Payload} -> ok;
        E3 -> fatal("~s: r3_hex_registry:decode_and_verify_signed/2 returned ~P", [File, E3, 10])
    end,
    {Msg, PbMod} = case Kind of
                       names -> {'Names', r3_hex_pb_names};
                       versions -> {'Versions', r3_hex_pb_versions};
                       package -> {'Package', r3_hex_pb_package}
                   end,
    Raw = case catch PbMod:decode_msg(Payload, Msg) of
              RM when is_map(RM) -> RM;
              E4 -> fatal("~s: payload is not a ~s protobuf: ~P", [File, Msg, E4, 10])
          end,
    case maps:get(repository, Raw, '$undef') of
        Repo -> ok;
        '$undef' -> fatal("~s: ~s.repository (required) missing", [File, Msg]);
        Other -> fatal("~s: ~s.repository is ~p, expected ~p", [File, Msg, Other, Repo])
    end,
    Kind =:= package andalso
        case maps:get(name, Raw, '$undef') of
            PkgName -> ok;
            '$undef' -> fatal("~s: Package.name (required) missing", [File]);
            OtherName -> fatal("~s: Package.name is ~p, expected ~p", [File, OtherName, PkgName])
        end,
    Decoded = case Kind of
                  names -> r3_hex_registry:decode_names(Payload, Repo);
                  versions -> r3_hex_registry:decode_versions(Payload, Repo);
                  package -> r3_hex_registry:decode_package(Payload, Repo, PkgName)
              end,
    Result = case Decoded of
                 {ok, L} when is_list(L) -> L;
                 E5 -> fatal("~s: r3_hex_registry decode of ~s returned ~P", [File, Msg, E5, 10])
             end,
    check_no_undef(File, Msg, Result),
    %% and the full client path: r3_hex_repo -> r3_hex_http -> our file adapter
    case catch ClientFun() of
        {ok, {200, _, Result}} -> ok;
        {ok, {200, _, Different}} ->
            fatal("~s: r3_hex_repo returned different content: ~P", [File, Different, 10]);
        E6 -> fatal("~s: r3_hex_repo client returned ~P", [File, E6, 10])
    end,
    Result.

%% gpb leaves missing required fields as '$undef'
check_no_undef(File, Msg, Term) ->
    case find_undef(Term, []) of
        [] -> ok;
        Path -> fatal("~s: required field missing in ~s at ~p", [File, Msg, Path])
    end.

find_undef('$undef', Path) -> lists:reverse(Path);
find_undef(M, Path) when is_map(M) ->
    first_undef([{K, V} || {K, V} <- lists:sort(maps:to_list(M))], Path);
find_undef(L, Path) when is_list(L) ->
    first_undef(lists:zip(lists:seq(0, length(L) - 1), L), Path);
find_undef(_, _) -> [].

first_undef([], _) -> [];
first_undef([{K, V} | T], Path) ->
    case find_undef(V, [K | Path]) of
        [] -> first_undef(T, Path);
        P -> P
    end.

check_unique(What, Names) ->
    [err("~s lists package ~s more than once", [What, N])
     || N <- lists:usort(Names -- lists:usort(Names))],
    ok.

%%--------------------------------------------------------------------
%% one package

%% returns {NumReleases, NumSkipped}
check_package(Dir, Repo, PubPem, Config, Name, VersionsEntry) ->
    RelPath = "packages/" ++ binary_to_list(Name),
    try
        Releases = check_signed_file(Dir, RelPath, package, Repo, Name, PubPem,
                                     fun() -> r3_hex_repo:get_package(Config, Name) end),
        io:format("package ~s: ~b releases~n", [Name, length(Releases)]),
        Versions = [V || #{version := V} <- Releases],
        check_unique("packages/" ++ binary_to_list(Name) ++ " releases", Versions),
        Skipped = lists:sum([check_release(Dir, Config, Name, R) || R <- Releases]),
        NonHex = [V || R = #{version := V} <- Releases, not is_hex_release(Dir, Name, R)],
        check_versions_entry(Name, VersionsEntry, Releases, NonHex),
        {length(Releases), Skipped}
    catch
        throw:{fatal, Msg} ->
            err("~s", [Msg]),
            {0, 0}
    end.

%% the versions file entry must agree with the package file
check_versions_entry(Name, undefined, _Releases, _NonHex) ->
    err("package ~s is in names but not in versions", [Name]);
check_versions_entry(Name, #{versions := Vs} = Entry, Releases, NonHex) ->
    RelVs = [V || #{version := V} <- Releases],
    [err("versions lists ~s ~s but packages/~s has no such release", [Name, V, Name])
     || V <- Vs, not lists:member(V, RelVs)],
    %% niso-only (non-hex) releases may be left out of versions
    [err("packages/~s has release ~s that versions does not list", [Name, V, Name])
     || V <- RelVs, not lists:member(V, Vs), not lists:member(V, NonHex)],
    Retired = maps:get(retired, Entry, []),
    [err("versions: ~s retired index ~b out of range (~b versions)", [Name, I, length(Vs)])
     || I <- Retired, I < 0 orelse I >= length(Vs)],
    RetiredVs = [lists:nth(I + 1, Vs) || I <- Retired, I >= 0, I < length(Vs)],
    [err("~s ~s: retired in ~s but not in versions (or the reverse)", [Name, V, Which])
     || #{version := V} = R <- Releases,
        lists:member(V, Vs),
        {Which, true} <- [{"packages/" ++ binary_to_list(Name),
                           maps:is_key(retired, R) xor lists:member(V, RetiredVs)}]],
    ok.

is_hex_release(Dir, Name, R) ->
    not (empty_outer(R) andalso not filelib:is_regular(tarball_path(Dir, Name, R))).

empty_outer(R) ->
    case maps:get(outer_checksum, R, <<>>) of
        <<>> -> true;
        _ -> false
    end.

tarball_path(Dir, Name, #{version := V}) ->
    filename:join([Dir, "tarballs", <<Name/binary, "-", V/binary, ".tar">>]).

hex(B) when is_binary(B) -> string:lowercase(binary:encode_hex(B));
hex(_) -> <<"-">>.

%% returns 1 if skipped, 0 otherwise
check_release(Dir, Config, Name, R = #{version := V, inner_checksum := Inner}) ->
    Outer = maps:get(outer_checksum, R, <<>>),
    Deps = maps:get(dependencies, R, []),
    io:format("  release ~s inner_checksum=~s outer_checksum=~s~s~n",
              [V, hex(Inner), case Outer of <<>> -> <<"(none)">>; _ -> hex(Outer) end,
               case R of
                   #{retired := Ret} ->
                       io_lib:format(" retired=~s~s",
                                     [maps:get(reason, Ret, '?'),
                                      case maps:get(message, Ret, undefined) of
                                          undefined -> "";
                                          RM -> io_lib:format(" message=~p", [RM])
                                      end]);
                   _ -> ""
               end]),
    [io:format("    dep ~s ~s~s~s~s~n",
               [P, Req,
                case maps:get(optional, D, false) of true -> " optional"; _ -> "" end,
                case maps:get(app, D, undefined) of
                    undefined -> ""; App -> [" app=", App] end,
                case maps:get(repository, D, undefined) of
                    undefined -> ""; DR -> [" repository=", DR] end])
     || D = #{package := P, requirement := Req} <- Deps],
    TarPath = tarball_path(Dir, Name, R),
    case {filelib:is_regular(TarPath), Outer} of
        {false, <<>>} ->
            io:format("skip ~s ~s (not a hex tarball)~n", [Name, V]),
            1;
        {false, _} ->
            err("~s ~s: ~s is missing but the release has outer_checksum ~s",
                [Name, V, TarPath, hex(Outer)]),
            0;
        {true, _} ->
            check_tarball(Config, Name, R, TarPath),
            0
    end.

check_tarball(Config, Name, R = #{version := V, inner_checksum := Inner}, TarPath) ->
    Outer = maps:get(outer_checksum, R, <<>>),
    Deps = maps:get(dependencies, R, []),
    {ok, Tar} = file:read_file(TarPath),
    %% the client fetches the tarball through r3_hex_repo:get_tarball/3
    case catch r3_hex_repo:get_tarball(Config, Name, V) of
        {ok, {200, _, Tar}} -> ok;
        Other -> err("~s ~s: r3_hex_repo:get_tarball/3 returned ~P", [Name, V, Other, 8])
    end,
    Sha = crypto:hash(sha256, Tar),
    Ok1 = case Outer of
              <<>> ->
                  err("~s ~s: ~s exists but the release has no outer_checksum",
                      [Name, V, TarPath]);
              Sha -> ok;
              _ -> err("~s ~s: sha256(~s) = ~s but the release's outer_checksum = ~s",
                       [Name, V, TarPath, hex(Sha), hex(Outer)])
          end,
    case catch r3_hex_tarball:unpack(Tar, memory) of
        {ok, #{inner_checksum := TInner, outer_checksum := TOuter,
               metadata := Meta, contents := Contents}} ->
            Checks =
                [case TInner of
                     Inner -> ok;
                     _ -> err("~s ~s: tarball inner checksum ~s but the release's "
                              "inner_checksum = ~s", [Name, V, hex(TInner), hex(Inner)])
                 end,
                 case TOuter of
                     Sha -> ok;
                     _ -> err("~s ~s: r3_hex_tarball outer checksum ~s != sha256 ~s",
                              [Name, V, hex(TOuter), hex(Sha)])
                 end,
                 case maps:get(<<"name">>, Meta, undefined) of
                     Name -> ok;
                     MN -> err("~s ~s: tarball metadata name is ~p", [Name, V, MN])
                 end,
                 case maps:get(<<"version">>, Meta, undefined) of
                     V -> ok;
                     MV -> err("~s ~s: tarball metadata version is ~p", [Name, V, MV])
                 end,
                 check_requirements(Name, V, Meta, Deps)],
            case lists:all(fun(C) -> C =:= ok end, [Ok1 | Checks]) of
                true ->
                    io:format("  tarball ~s-~s.tar ok: sha256 = outer_checksum, "
                              "inner checksum matches, metadata ~s ~s, ~b files~n",
                              [Name, V, Name, V, length(Contents)]);
                false -> ok
            end;
        {error, Reason} ->
            err("~s ~s: r3_hex_tarball:unpack(~s, memory) failed: ~s",
                [Name, V, TarPath, catch r3_hex_tarball:format_error(Reason)]);
        Other2 ->
            err("~s ~s: r3_hex_tarball:unpack(~s, memory) returned ~P",
                [Name, V, TarPath, Other2, 8])
    end.

%% the registry's dependencies must be the tarball metadata's requirements
check_requirements(Name, V, Meta, Deps) ->
    Reqs = maps:get(<<"requirements">>, Meta, #{}),
    FromMeta = lists:sort(
                 [{P, maps:get(<<"requirement">>, M, undefined),
                   maps:get(<<"optional">>, M, false) =:= true}
                  || {P, M} <- maps:to_list(Reqs)]),
    FromIndex = lists:sort(
                  [{P, Req, maps:get(optional, D, false) =:= true}
                   || D = #{package := P, requirement := Req} <- Deps]),
    case FromMeta =:= FromIndex of
        true -> ok;
        false -> err("~s ~s: dependencies in the index ~p differ from the tarball "
                     "metadata requirements ~p (as {package, requirement, optional})",
                     [Name, V, FromIndex, FromMeta])
    end.
